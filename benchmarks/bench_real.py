"""Benchmark: ``prime refine`` against RELION 3.1 auto-refine on real particles.

Data: ../shared/data/real/betagal_empiar10204, 1,157 real EMPIAR-10204 beta-galactosidase
particles (box 64, 3.54 A/px, D2, per-micrograph CTF), copied once into the cache folder
with the stacks converted to float32 (RELION 3.1 refuses float16); the cache folder is
the project folder every command runs in. ``model.mrc``: the 5A1A model's density
(gemmi, tools/make_demo_map.py's ``model_map``: D2 axes on x, y, z, centre at voxel 32)
at 3.54 A/px to Nyquist (7.08 A); ``start.mrc``: that map low-passed to 40 A, the start
of both programs (each also low-passes it to 40 A itself, --ini_high 40).

Runs (in the cache folder, each wrapped in GNU time -v; wall time is the whole command):

    prime refine --i particles.star --ref start.mrc --o prime --sym D2 --particle_diameter 200 --j 2
    prime refine ... --o prime_shc_plain --search shc --no_noise_model --update_frac 0.1
        (the search and objective of the earlier releases: stochastic hill climbing, plain correlation)
    mpirun --allow-run-as-root --oversubscribe -np 3 relion_refine_mpi --auto_refine ... --sym D2
        (bench_refine.py's RELION command with --sym D2 --particle_diameter 200; each rank under its
        own GNU time, their peaks summed)

RELION's run takes about two hours here. While it runs the machine must stay quiet; to measure
something else meanwhile, suspend it (``--suspend``) and resume it (``--resume``): the pauses are
logged in CACHE/relion.pauses and left out of its running time, its time limit and its load
figures. Its scores are kept in benchmarks/bench_real_relion.json (committed), so that a later
session or another machine compares with it without running RELION again (``--rerun relion``
runs it anew).

Scores, computed here from each program's written files in the same way:
- gold-standard resolution: FSC 0.143 between the two half maps under a soft sphere of 220 A
  diameter (1 inside 204 A, a raised-cosine edge falling to 0 at 220 A), and unmasked;
- the map against the 5A1A model map (both under the same sphere) at FSC 0.5 and 0.143;
- angular error against reference_poses.star (428 of the particles, matched by image name:
  RELION's own 2.84 A refinement of the tutorial data), symmetry-aware (the smallest angle
  over the D2 mates) and in the best frame: the reference poses' map may differ from the 5A1A
  map by a rotation that maps the D2 axes onto each other, so the rotation of the octahedral
  group (24) giving the smallest median error is used, one for the whole run. Median, 90th
  percentile and the fraction within 5 degrees; origin error (px) in the same way;
- wall time, CPU time and peak memory of the whole command; the same scores per iteration
  (run_itNNN_* files), timed from the start of the command by run.log's time stamps (prime) or
  the files' modification times (RELION, pauses left out).

    python benchmarks/bench_real.py --cache /tmp/bench_real [--rerun NAME ...] [--no_results]
    python benchmarks/bench_real.py --cache /tmp/bench_real --score DIR [DIR ...]   (score prime output folders)
    python benchmarks/bench_real.py --cache /tmp/bench_real --suspend | --resume     (RELION's run)
    python benchmarks/bench_real.py --cache /tmp/bench_real --relion_only | --prime_only  (one program's runs)

Prints the table and writes (or replaces) this benchmark's section of benchmarks/RESULTS.md;
the per-iteration figure goes to benchmarks/real_convergence.png.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
from bench_common import (REPO, add_relion_pause_arguments, prime_executable, suspend_run, timed_relion_run, timed_run,
                          update_results)
from prime_plugin.core.fourier import fsc, low_pass, resolution_at, soft_sphere_mask
from prime_plugin.core.geometry import euler_to_matrix, rotation_angles_deg
from prime_plugin.core.symmetry import symmetry_operators

SHARED = Path(os.environ.get("PRIME_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCE = SHARED / "real" / "betagal_empiar10204"
BOX, APIX, SYMMETRY, DIAMETER_A = 64, 3.54, "D2", 200
MASK_DIAMETER_A, MASK_EDGE_PX = 220.0, 3.0
SECTION = "## Real particles: prime refine vs RELION 3.1 auto-refine (EMPIAR-10204 beta-galactosidase)"
RELION_RECORD = REPO / "benchmarks" / "bench_real_relion.json"
FIGURE = REPO / "benchmarks" / "real_convergence.png"
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGINS = ["rlnOriginXAngst", "rlnOriginYAngst"]

COMMON = ["--i", "particles.star", "--ref", "start.mrc", "--sym", SYMMETRY, "--particle_diameter", str(DIAMETER_A),
          "--j", "2"]
PRIME_RUNS = {
    "prime": ["refine", *COMMON, "--o", "prime"],
    "prime_shc_plain": ["refine", *COMMON, "--o", "prime_shc_plain", "--search", "shc", "--no_noise_model",
                        "--update_frac", "0.1"],
}
LABELS = {"prime": "prime (defaults)",
          "prime_shc_plain": "prime --search shc --no_noise_model --update_frac 0.1 (the earlier search and objective)",
          "relion": "RELION 3.1 auto-refine (MPI -np 3)"}
RELION_ARGS = ["--auto_refine", "--split_random_halves", "--ctf", "--firstiter_cc", "--ini_high", "40",
               "--particle_diameter", str(DIAMETER_A), "--healpix_order", "2", "--auto_local_healpix_order", "4",
               "--offset_range", "5", "--offset_step", "2", "--flatten_solvent", "--zero_mask", "--norm", "--scale",
               "--pad", "2", "--low_resol_join_halves", "40", "--dont_combine_weights_via_disc", "--pool", "30",
               "--j", "1", "--i", "particles.star", "--ref", "start.mrc", "--o", "Refine3D/run", "--sym", SYMMETRY]


# ---------------------------------------------------------------- data

def write_map(path, volume):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = APIX


def make_data(cache):
    """particles.star with float32 stacks, reference_poses.star, model.mrc and start.mrc in ``cache``."""
    if (cache / "start.mrc").is_file():
        return
    sys.path.insert(0, str(REPO / "tools"))
    from make_demo_map import model_map  # needs gemmi (pip install gemmi)

    cache.mkdir(parents=True, exist_ok=True)
    for stack in sorted((SOURCE / "Extract").rglob("*.mrcs")):
        target = cache / stack.relative_to(SOURCE)
        target.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.new(target, overwrite=True) as mrc:
            mrc.set_data(mrcfile.read(stack).astype(np.float32))
            mrc.voxel_size = APIX
    for name in ("particles.star", "reference_poses.star"):
        shutil.copyfile(SOURCE / name, cache / name)
    model = model_map(SHARED / "models" / "5a1a.cif.gz", BOX, APIX, 2 * APIX)
    write_map(cache / "model.mrc", model)
    write_map(cache / "start.mrc", low_pass(model, 40.0, APIX))


# ---------------------------------------------------------------- runs

def run_prime(cache, rerun):
    """The prime runs whose records are missing (or named in ``rerun``); returns every run's record."""
    for name, args in PRIME_RUNS.items():
        if name in rerun or not (cache / f"timing_{name}.json").is_file():
            shutil.rmtree(cache / name, ignore_errors=True)
            timed_run(name, [prime_executable(), *args], "prime " + " ".join(args), cache)
    return {name: json.loads((cache / f"timing_{name}.json").read_text()) for name in PRIME_RUNS}


def run_relion(cache, rerun, relion_limit_min):
    """RELION's run, unless its record is in the cache or committed (and ``rerun`` does not name it)."""
    if "relion" in rerun or (not (cache / "timing_relion.json").is_file() and not RELION_RECORD.is_file()):
        timed_relion_run(cache, RELION_ARGS, relion_limit_min)


# ---------------------------------------------------------------- scores

def image_key(name):
    index, stack = str(name).split("@", 1)
    return int(index), Path(stack).name


def read_poses(star):
    """Angles (n, 3) deg, origins (n, 2) px and the image keys of a particle STAR file."""
    table = starfile.read(star)
    particles = table["particles"] if isinstance(table, dict) else table
    keys = particles["rlnImageName"].map(image_key)
    return particles[ANGLES].to_numpy(np.float64), particles[ORIGINS].to_numpy(np.float64) / APIX, pd.Index(keys)


def frame_rotations():
    """The 24 rotations that map the coordinate axes onto each other (the octahedral group), (24, 3, 3)."""
    return symmetry_operators("O")


def angular_errors(reference_deg, found_deg, frame=None):
    """Per particle, the smallest angle (deg) between the found rotation and the reference one over the
    D2 mates, in the frame ``frame`` (3, 3) or, when None, in the best of the 24 frames (the one of
    smallest median error). Returns (errors (n,), frame)."""
    a = euler_to_matrix(*np.asarray(reference_deg).T)
    b = euler_to_matrix(*np.asarray(found_deg).T)
    mates = symmetry_operators(SYMMETRY)
    best = None
    for g in ([frame] if frame is not None else frame_rotations()):
        errors = rotation_angles_deg(a @ g, b, mates)  # found = reference @ g @ mate at a perfect match
        if best is None or np.median(errors) < np.median(best[0]):
            best = (errors, g)
    return best


def pose_scores(cache, data_star, frame=None):
    """Angular and origin errors of ``data_star`` against reference_poses.star (see the module docstring)."""
    ref_angles, ref_origins, ref_keys = read_poses(cache / "reference_poses.star")
    angles, origins, keys = read_poses(data_star)
    order = keys.get_indexer(ref_keys)
    if (order < 0).any():
        raise SystemExit(f"{data_star}: {(order < 0).sum()} of the reference particles missing")
    errors, frame = angular_errors(ref_angles, angles[order], frame)
    return {"median_error_deg": float(np.median(errors)), "p90_error_deg": float(np.percentile(errors, 90)),
            "within_5deg": float(np.mean(errors <= 5.0)), "matched": len(errors),
            "median_origin_error_px": float(np.median(np.linalg.norm(origins[order] - ref_origins, axis=1))),
            "frame": np.round(frame).astype(int).tolist(), "errors": errors}


def sphere_mask():
    radius_px = MASK_DIAMETER_A / 2 / APIX - MASK_EDGE_PX
    return soft_sphere_mask(BOX, radius_px, MASK_EDGE_PX)


def map_scores(cache, half1, half2, combined=None):
    """Gold-standard resolution (masked, unmasked) and the map (or the mean of the halves) against the model."""
    mask = sphere_mask()
    v1, v2 = mrcfile.read(half1).astype(np.float64), mrcfile.read(half2).astype(np.float64)
    volume = mrcfile.read(combined).astype(np.float64) if combined else 0.5 * (v1 + v2)
    model = mrcfile.read(cache / "model.mrc")
    versus_model = fsc(volume * mask, model * mask)
    return {"gold_standard_A": float(resolution_at(fsc(v1 * mask, v2 * mask), 0.143, BOX, APIX)),
            "gold_standard_unmasked_A": float(resolution_at(fsc(v1, v2), 0.143, BOX, APIX)),
            "model_05_A": float(resolution_at(versus_model, 0.5, BOX, APIX)),
            "model_0143_A": float(resolution_at(versus_model, 0.143, BOX, APIX))}


def elapsed_without_pauses(moment, started, pauses):
    return moment - started - sum(max(0.0, min(end, moment) - begin) for begin, end in pauses if begin < moment)


def prime_series(cache, folder, record):
    """Per iteration of a prime run: elapsed s since the command started (run.log), map and pose scores."""
    started = record["started"] if record else None
    series = []
    for line in (folder / "run.log").read_text().splitlines():
        found = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) iteration +(\d+):", line)
        if not found:
            continue
        iteration = int(found.group(2))
        stem = folder / f"run_it{iteration:03d}"
        if not Path(f"{stem}_data.star").is_file():
            continue
        moment = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        point = {"iteration": iteration, "elapsed_s": moment - started if started else float("nan")}
        point.update(map_scores(cache, f"{stem}_half1_class001_unfil.mrc", f"{stem}_half2_class001_unfil.mrc"))
        point.update({k: v for k, v in pose_scores(cache, f"{stem}_data.star").items() if k != "errors"})
        series.append(point)
    return series


def relion_series(cache, record):
    """Per RELION iteration (from 2: RELION 3.1's first half maps are practically identical): elapsed s
    (the files' times, pauses left out), map and pose scores."""
    series = []
    folder = cache / "Refine3D"
    for data in sorted(folder.glob("run_it[0-9][0-9][0-9]_data.star")):
        iteration = int(data.name[6:9])
        stem = folder / f"run_it{iteration:03d}"
        halves = [Path(f"{stem}_half{h}_class001.mrc") for h in (1, 2)]
        if iteration < 2 or not all(h.is_file() for h in halves):
            continue
        point = {"iteration": iteration,
                 "elapsed_s": elapsed_without_pauses(data.stat().st_mtime, record["started"], record["pauses"])}
        point.update(map_scores(cache, *halves))
        point.update({k: v for k, v in pose_scores(cache, data).items() if k != "errors"})
        series.append(point)
    return series


def score_prime(cache, folder, record=None):
    folder = Path(folder)
    row = {"record": record, "series": prime_series(cache, folder, record)}
    row.update(map_scores(cache, folder / "run_half1_class001_unfil.mrc", folder / "run_half2_class001_unfil.mrc",
                          folder / "run_class001.mrc"))
    row.update(pose_scores(cache, folder / "run_data.star"))
    converged = re.search(r"Converged at iteration (\d+)", (folder / "run.log").read_text())
    row["iterations"] = len(row["series"])
    row["converged"] = int(converged.group(1)) if converged else None
    return row


def score_relion(cache):
    """RELION's scores from its files in the cache, or from the committed record when they are absent."""
    timing = cache / "timing_relion.json"
    if not timing.is_file():
        row = json.loads(RELION_RECORD.read_text())
        row["errors"] = np.array(row["errors"])
        return row
    record = json.loads(timing.read_text())
    folder = cache / "Refine3D"
    series = relion_series(cache, record)
    final = folder / "run_half1_class001_unfil.mrc"
    if final.is_file():
        row = map_scores(cache, final, folder / "run_half2_class001_unfil.mrc", folder / "run_class001.mrc")
        row.update(pose_scores(cache, folder / "run_data.star"))
    else:  # stopped: its last complete iteration
        stem = folder / f"run_it{series[-1]['iteration']:03d}"
        row = map_scores(cache, f"{stem}_half1_class001.mrc", f"{stem}_half2_class001.mrc")
        row.update(pose_scores(cache, f"{stem}_data.star"))
        record["wall_s"] = series[-1]["elapsed_s"]
    stdout = (cache / "relion.stdout").read_text(errors="replace")
    row.update({"record": record, "series": series, "iterations": series[-1]["iteration"] if series else 0,
                "converged": "has converged" in stdout, "scored": datetime.date.today().isoformat()})
    RELION_RECORD.write_text(json.dumps(dict(row, errors=np.round(row["errors"], 4).tolist()), indent=1) + "\n")
    return row


# ---------------------------------------------------------------- report

def fmt(value, spec=".2f"):
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def table(rows):
    lines = ["| run | wall (s) | CPU (s) | peak RSS (MB) | iterations | gold-standard FSC 0.143, masked / unmasked (A) "
             "| map vs 5A1A model, FSC 0.5 / 0.143 (A) | angular error vs reference poses: median / 90th pct (deg) "
             "| within 5 deg | median origin error (px) | load during (mean / max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in LABELS.items():
        r = rows[name]
        rec = r["record"]
        if name == "relion":
            note = "converged" if r["converged"] else ("stopped" if rec.get("stopped") else "not converged")
        else:
            note = f"converged at {r['converged']}" if r["converged"] else "max_iter reached"
        cpu = rec.get("user_s", float("nan")) + rec.get("sys_s", 0.0)
        lines.append(f"| {label} | {rec['wall_s']:.0f} | {fmt(cpu, '.0f')} | {fmt(rec.get('rss_mb'), '.0f')} | "
                     f"{r['iterations']} ({note}) | {r['gold_standard_A']:.2f} / {r['gold_standard_unmasked_A']:.2f} | "
                     f"{r['model_05_A']:.2f} / {r['model_0143_A']:.2f} | {r['median_error_deg']:.2f} / "
                     f"{r['p90_error_deg']:.1f} | {100 * r['within_5deg']:.0f}% | {r['median_origin_error_px']:.2f} | "
                     f"{rec['load_mean']:.2f} / {rec['load_max']:.2f} |")
    return "\n".join(lines)


def series_table(rows):
    lines = ["| run | iteration: elapsed s, gold-standard A, vs model FSC 0.5 A, median angular error deg, within 5 deg |",
             "|---|---|"]
    for name, label in LABELS.items():
        cells = "; ".join(f"{s['iteration']}: {s['elapsed_s']:.0f} s, {s['gold_standard_A']:.2f}, {s['model_05_A']:.2f},"
                          f" {s['median_error_deg']:.2f}, {100 * s['within_5deg']:.0f}%" for s in rows[name]["series"])
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def goals(rows):
    ours, theirs = rows["prime"], rows["relion"]
    wall, their_wall = ours["record"]["wall_s"], theirs["record"]["wall_s"]
    checks = [
        ("gold-standard resolution at least RELION's", ours["gold_standard_A"] <= theirs["gold_standard_A"],
         f"{ours['gold_standard_A']:.2f} vs {theirs['gold_standard_A']:.2f} A"),
        ("map vs model at least RELION's (FSC 0.5)", ours["model_05_A"] <= theirs["model_05_A"],
         f"{ours['model_05_A']:.2f} vs {theirs['model_05_A']:.2f} A"),
        ("median angular error no larger than RELION's", ours["median_error_deg"] <= theirs["median_error_deg"],
         f"{ours['median_error_deg']:.2f} vs {theirs['median_error_deg']:.2f} deg; within 5 deg "
         f"{100 * ours['within_5deg']:.0f}% vs {100 * theirs['within_5deg']:.0f}%"),
        ("at most one tenth of RELION's wall time", wall <= their_wall / 10,
         f"{wall:.0f} s vs {their_wall:.0f} s: {their_wall / wall:.1f}x less"),
    ]
    return "\n".join(f"- {what}: {'holds' if ok else 'does not hold'} ({figures})." for what, ok, figures in checks)


def convergence_figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    for name, label in LABELS.items():
        series = rows[name]["series"]
        minutes = [s["elapsed_s"] / 60 for s in series]
        axes[0].plot(minutes, [s["gold_standard_A"] for s in series], "o-", ms=3, label=label)
        axes[1].plot(minutes, [s["model_05_A"] for s in series], "o-", ms=3, label=label)
        axes[2].plot(minutes, [s["median_error_deg"] for s in series], "o-", ms=3, label=label)
    axes[0].set_ylabel("gold-standard FSC 0.143 (A)")
    axes[1].set_ylabel("map vs 5A1A, FSC 0.5 (A)")
    axes[2].set_ylabel("median angular error (deg)")
    axes[2].set_yscale("log")
    for axis in axes[:2]:
        axis.invert_yaxis()
    axes[0].legend(fontsize=8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("wall time since the command started (min)")
    fig.suptitle("EMPIAR-10204 beta-galactosidase, 1,157 real particles, 64 px, 3.54 A/px, D2")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def section(rows, command_line):
    commands = "\n".join(f"    {rows[name]['record']['command']}" for name in LABELS)
    relion = rows["relion"]
    return f"""{SECTION}

Command: `{command_line}` (run from the repository root), {datetime.date.today().isoformat()},
{os.cpu_count()} cores (shared; the 1-minute load is sampled during each run: a run on 2 threads alone gives ~2).
Code: {', '.join(sorted({rows[n]['record'].get('git', '?') for n in PRIME_RUNS}))}. RELION's run: scored
{relion.get('scored', '?')} (code {relion['record'].get('git', '?')}), {relion['record'].get('paused_s', 0):.0f} s
suspended and not counted. Data: ../shared/data/real/betagal_empiar10204 (1,157 particles, float32 copy), start:
the 5A1A model map low-passed to 40 A. Commands (in the cache folder):

{commands}

Scores from the written files (see the script's docstring: soft 220 A sphere; angular error over the
{rows['prime']['matched']} particles of reference_poses.star, symmetry-aware, in the best of the 24 axis
frames, here {rows['prime']['frame']} for prime and {relion['frame']} for RELION).

{table(rows)}

Per iteration:

{series_table(rows)}

Goals (prime with its defaults against RELION):

{goals(rows)}

Figure: benchmarks/real_convergence.png (resolutions and median angular error against wall time).
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, type=Path, help="data and run folder (data made once)")
    parser.add_argument("--rerun", nargs="*", default=[], choices=[*PRIME_RUNS, "relion"],
                        help="runs to repeat although their records exist")
    parser.add_argument("--relion_limit_min", type=float, default=240.0,
                        help="stop RELION after this many minutes of running time")
    parser.add_argument("--no_results", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--score", nargs="+", type=Path, metavar="DIR", help="only score these prime output folders")
    parser.add_argument("--relion_only", action="store_true", help="only make the data and run RELION")
    parser.add_argument("--prime_only", action="store_true",
                        help="only make the data and run prime (while RELION's run is suspended, say)")
    add_relion_pause_arguments(parser)
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    if args.suspend or args.resume:
        suspend_run(cache, "relion", resume=args.resume)
        return
    make_data(cache)
    if args.score:
        for folder in args.score:
            row = score_prime(cache, folder.resolve())
            print(f"{folder}: " + ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in row.items()
                                            if k not in ("series", "errors", "record")))
        return
    if not args.prime_only:
        run_relion(cache, set(args.rerun), args.relion_limit_min)
    if args.relion_only:
        return
    records = run_prime(cache, set(args.rerun))
    if args.prime_only:
        return
    rows = {name: score_prime(cache, cache / name, records[name]) for name in PRIME_RUNS}
    rows["relion"] = score_relion(cache)
    convergence_figure(rows, FIGURE)
    command_line = "python benchmarks/bench_real.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = section(rows, command_line)
    print(text)
    if not args.no_results:
        update_results(SECTION, text)


if __name__ == "__main__":
    main()
