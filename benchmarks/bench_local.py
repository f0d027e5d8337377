"""Benchmark: local refinement from input poses (``prime refine --local``) against a global refinement.

Data: bench_refine.py's (5,000 relion_project particles of the ribosome, box 64, 5 A/px, SNR 0.05,
CTF 1-3 um, origins up to 4 px; made in the cache folder by bench_refine's make_data when missing).
The local run's input, perturbed.star, is truth.star with every orientation turned by 3 degrees
about a random axis and every origin moved by 2 px in a random direction (seed 7), the situation
after an earlier refinement or a classification. Both runs start from start.mrc (low-passed to
40 A by prime itself, --ini_high 40). Commands (in the cache folder, each under GNU time):

    prime refine --i input.star --ref start.mrc --o global --particle_diameter 300 --j 2
    prime refine --i perturbed.star --ref start.mrc --o local --particle_diameter 300 --local --j 2

Scores from the written files, as bench_refine.py computes them: median angular error and origin
error against the true poses, gold-standard FSC 0.143 under soft_sphere_mask(64, 30, 4), map vs
the true map at FSC 0.5; the same per iteration (run_itNNN_*), timed from the start of the command
by run.log's time stamps. "Reached": the first moment a run's median angular error is within 0.1
degree of the global run's final one.

    python benchmarks/bench_local.py --cache /tmp/bench_refine [--rerun global local] [--no_results]
"""

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import starfile

import bench_refine
from bench_common import REPO, prime_executable, timed_run, update_results

sys.path.insert(0, str(REPO / "tests"))
from relion_datasets import perturbed_poses  # noqa: E402  (the tests' own perturbation)

SECTION = "## Local refinement from input poses (prime refine --local)"
TURN_DEG, MOVE_PX, SEED = 3.0, 2.0, 7
COMMON = ["--ref", "start.mrc", "--particle_diameter", "300", "--j", "2"]
RUNS = {"global": ["refine", "--i", "input.star", "--o", "global", *COMMON],
        "local": ["refine", "--i", "perturbed.star", "--o", "local", *COMMON, "--local"]}
REACH_DEG = 0.1


def make_perturbed(cache):
    """perturbed.star: truth.star with every pose perturbed (module docstring)."""
    if (cache / "perturbed.star").is_file():
        return
    blocks = starfile.read(cache / "truth.star")
    particles = blocks["particles"]
    angles = particles[bench_refine.ANGLES].to_numpy(np.float64)
    origins = particles[bench_refine.ORIGINS].to_numpy(np.float64) / bench_refine.APIX
    turned, moved = perturbed_poses(angles, origins, TURN_DEG, MOVE_PX, SEED)
    particles[bench_refine.ANGLES] = turned
    particles[bench_refine.ORIGINS] = moved * bench_refine.APIX
    starfile.write(blocks, cache / "perturbed.star", float_format="%.8f")


def run(cache, rerun):
    records = {}
    for name, args in RUNS.items():
        if name in rerun or not (cache / f"timing_{name}.json").is_file():
            shutil.rmtree(cache / name, ignore_errors=True)
            timed_run(name, [prime_executable(), *args], "prime " + " ".join(args), cache)
        records[name] = json.loads((cache / f"timing_{name}.json").read_text())
    return records


def score(cache, name, record):
    out = cache / name
    angles, origins = bench_refine.pose_errors(cache / "truth.star", out / "run_data.star")
    masked, unmasked = bench_refine.half_map_resolutions(out / "run_half1_class001_unfil.mrc",
                                                         out / "run_half2_class001_unfil.mrc")
    truth = bench_refine.truth_resolution(out / "run_class001.mrc", mrcfile.read(cache / "truth.mrc"))
    return {"record": record, "median_error_deg": float(np.median(angles)),
            "median_origin_error_px": float(np.median(origins)), "masked_A": masked, "unmasked_A": unmasked,
            "truth_05_A": truth, "series": bench_refine.prime_series(cache, name, record)}


def reached(series, target_deg):
    return next((s["elapsed_s"] for s in series if s["median_error_deg"] <= target_deg), None)


def section(rows, command_line):
    target = rows["global"]["median_error_deg"] + REACH_DEG
    lines = ["| run | wall (s) | CPU (s) | iterations | median angular error (deg) | median origin error (px) | "
             f"gold-standard FSC 0.143 masked / unmasked (A) | map vs truth FSC 0.5 (A) | reached {target:.2f} deg at (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        rec = row["record"]
        at = reached(row["series"], target)
        lines.append(f"| {rec['command']} | {rec['wall_s']:.0f} | {rec['user_s'] + rec['sys_s']:.0f} | "
                     f"{len(row['series'])} | {row['median_error_deg']:.2f} | {row['median_origin_error_px']:.2f} | "
                     f"{row['masked_A']:.2f} / {row['unmasked_A']:.2f} | {row['truth_05_A']:.2f} | "
                     f"{'not reached' if at is None else f'{at:.0f}'} |")
    series = ["| run | iteration: elapsed s, gold-standard A, median angular error deg |", "|---|---|"]
    for name, row in rows.items():
        cells = "; ".join(f"{s['iteration']}: {s['elapsed_s']:.0f} s, {s['resolution_A']:.2f}, "
                          f"{s['median_error_deg']:.2f}" for s in row["series"])
        series.append(f"| {name} | {cells} |")
    local_at, global_wall = reached(rows["local"]["series"], target), rows["global"]["record"]["wall_s"]
    ratio = "not reached" if local_at is None else f"{global_wall / local_at:.1f}x less than the global run's wall time"
    local_wall = rows["local"]["record"]["wall_s"]
    return f"""{SECTION}

Command: `{command_line}` (run from the repository root). Code: {rows['local']['record'].get('git', '?')}.
Data and method: the script's docstring (bench_refine.py's 5,000 simulated ribosome particles; the local
run starts from the true poses turned by {TURN_DEG:g} degrees and moved by {MOVE_PX:g} px).

{chr(10).join(lines)}

Per iteration:

{chr(10).join(series)}

The issue's target (the global run's median angular error, within {REACH_DEG} degree, in at most one fifth of
its wall time): the local run reached it at {'n/a' if local_at is None else f'{local_at:.0f} s'} ({ratio});
its whole run took {local_wall:.0f} s ({global_wall / local_wall:.1f}x less than the global run).
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, type=Path, help="bench_refine.py's data and run folder")
    parser.add_argument("--rerun", nargs="*", default=[], choices=list(RUNS), help="runs to repeat")
    parser.add_argument("--no_results", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    bench_refine.make_data(cache)
    make_perturbed(cache)
    records = run(cache, set(args.rerun))
    rows = {name: score(cache, name, records[name]) for name in RUNS}
    text = section(rows, "python benchmarks/bench_local.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    print(text)
    if not args.no_results:
        update_results(SECTION, text)


if __name__ == "__main__":
    main()
