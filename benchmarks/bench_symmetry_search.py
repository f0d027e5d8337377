"""Benchmark: symmetry axes in C1 maps at box 64 (find_symmetry_axes) against the truth and relion_align_symmetry.

Maps, each turned by ``--n`` random rotations (seeds 0..n-1): the shipped beta-galactosidase map
(prime_plugin/data/betagal_d2_64.mrc, D2 in RELION's orientation, 3.6 A/px) turned by
rotate_volume; for C4, D7, T, O and I the tests' analytic blob maps (tests/test_symmetry_search.py's
blob_map, 64^3, 4 A/px), whose rotated copies are computed, not interpolated. Per group: the wall
time of find_symmetry_axes with its defaults (the numba kernel compiled beforehand; 2 threads) and
the largest angle between its axes and the truth's (axis_disagreement_deg); with ``--relion``,
the same for

    relion_align_symmetry --i in.mrc --o out.mrc --sym G --box_size 32 --nr_uniform 2000

(RELION's help advises the small box; the tests now add --local_search_range 3, see
tests/test_symmetry_search.relion_rotation) and for its defaults, RELION's rotation read from the
angles it prints.

    python benchmarks/bench_symmetry_search.py [--n 5] [--relion] [--no_results]
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import REPO, update_results

sys.path.insert(0, str(REPO / "tests"))
from test_symmetry_search import BETAGAL, blob_map, random_rotation  # noqa: E402  (the tests' own maps)

from prime_plugin.core.geometry import euler_to_matrix  # noqa: E402
from prime_plugin.core.mrc import read_volume, write_volume  # noqa: E402
from prime_plugin.core.symmetry_search import axis_disagreement_deg, find_symmetry_axes  # noqa: E402
from prime_plugin.core.volume_rotation import rotate_volume  # noqa: E402

GROUPS = ["D2", "C4", "D7", "T", "O", "I"]
RELION_SETTINGS = {"box 32": ["--box_size", "32", "--nr_uniform", "2000"], "defaults": []}


def rotated_map(symmetry, seed):
    """(map float32 64^3, pixel size A, truth R) for one group and seed."""
    rotation = random_rotation(1000 + seed)
    if symmetry == "D2":
        volume, pixel_size_A = read_volume(REPO / BETAGAL)
        return rotate_volume(volume, rotation), pixel_size_A, rotation.T
    return blob_map(symmetry, 64, rotation, seed=seed), 4.0, rotation.T


def relion_rotation(volume, pixel_size_A, symmetry, options, folder):
    """(rotation, wall time s) of relion_align_symmetry on one map."""
    write_volume(folder / "in.mrc", volume, pixel_size_A)
    start = time.perf_counter()
    done = subprocess.run(["relion_align_symmetry", "--i", "in.mrc", "--o", "out.mrc", "--sym", symmetry, *options],
                          cwd=folder, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    angles = re.search(r"refined solution is ROT = (\S+) TILT = (\S+) PSI = (\S+)", done.stdout).groups()
    return euler_to_matrix(*map(float, angles)), elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5, help="random rotations per group")
    parser.add_argument("--relion", action="store_true", help="also run relion_align_symmetry")
    parser.add_argument("--no_results", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()

    find_symmetry_axes(blob_map("D2", 32, np.eye(3), seed=0), 4.0, "D2")  # compile the kernel outside the timing
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for symmetry in GROUPS:
            times, errors, versus = [], [], {name: [] for name in RELION_SETTINGS}
            relion_errors, relion_times = {name: [] for name in RELION_SETTINGS}, {name: [] for name in RELION_SETTINGS}
            for seed in range(args.n):
                volume, pixel_size_A, truth = rotated_map(symmetry, seed)
                start = time.perf_counter()
                found = find_symmetry_axes(volume, pixel_size_A, symmetry)
                times.append(time.perf_counter() - start)
                errors.append(axis_disagreement_deg(symmetry, found.rotation, truth))
                for name, options in RELION_SETTINGS.items() if args.relion else ():
                    A, elapsed = relion_rotation(volume, pixel_size_A, symmetry, options, Path(scratch))
                    relion_times[name].append(elapsed)
                    relion_errors[name].append(axis_disagreement_deg(symmetry, A, truth))
                    versus[name].append(axis_disagreement_deg(symmetry, found.rotation, A))
                print(symmetry, seed, f"{times[-1]:.2f} s, {errors[-1]:.3f} deg", flush=True)
            rows.append((symmetry, times, errors, relion_times, relion_errors, versus))

    lines = ["## Symmetry axes in C1 maps (find_symmetry_axes, prime align_symmetry)", "",
             f"Command: `python benchmarks/bench_symmetry_search.py --n {args.n}{' --relion' if args.relion else ''}`, "
             f"{time.strftime('%Y-%m-%d')}, 2 cores shared with other work (load average at the end "
             f"{', '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}). Box 64; {args.n} random rotations "
             "per group; D2 is the beta-galactosidase map, the others analytic blob maps (the script's docstring). "
             "Error: the largest angle between an axis found and the nearest true axis of the same order.", "",
             "| group | prime median time (s) | prime max error vs truth (deg) |"
             + (" RELION (--box_size 32 --nr_uniform 2000) max error vs truth | prime vs it, max | RELION defaults: max error, "
                "runs > 2 deg | RELION median time (s), box 32 / defaults |" if args.relion else ""),
             "|---|---|---|" + ("---|---|---|---|" if args.relion else "")]
    for symmetry, times, errors, relion_times, relion_errors, versus in rows:
        line = f"| {symmetry} | {np.median(times):.2f} | {max(errors):.3f} |"
        if args.relion:
            tests, defaults = "box 32", "defaults"
            over = sum(e > 2.0 for e in relion_errors[defaults])
            line += (f" {max(relion_errors[tests]):.2f} | {max(versus[tests]):.2f} | {max(relion_errors[defaults]):.1f}, "
                     f"{over} of {args.n} | {np.median(relion_times[tests]):.1f} / {np.median(relion_times[defaults]):.1f} |")
        lines.append(line)
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        update_results("## Symmetry axes in C1 maps", text)


if __name__ == "__main__":
    main()
