"""Central sections: our Fourier projector against RELION's relion_project, and the refine workload.

    python benchmarks/bench_projector.py [--n 2000] [--repeats 5]

Volume: the shared 70S ribosome map cropped to 64^3 (5 A/px). Two measurements:

1. The reference sections one ``prime refine`` iteration makes per half map: the polar
   central sections (rings 2-15 Fourier px, n_rot for a 29 px mask) of the --nspace 2000
   directions of C1, through ``FourierProjector.sample`` (the numba kernel) and through
   ``PolarReferences.from_projector`` (kernel plus ring spectra), 2 threads. Median of
   --repeats runs, in samples per second and seconds per call.
2. --n whole projections (64^2 real-space images at random orientations written to an MRC
   stack), ours (``FourierProjector.project``, one numba thread and two) against
   relion_project (one thread; the same angles from a STAR file), each command timed from
   start to written file, interleaved, median of --repeats; ours also from reading the map
   to the written stack (without Python's start-up and imports, about a second). The images are compared
   (correlation over the box) to show both made the same projections.

Prints the figures; record them in benchmarks/RESULTS.md by hand with the command.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numba
import numpy as np
import pandas as pd
import starfile
from scipy.spatial.transform import Rotation

from prime_plugin.core.directions import asymmetric_unit_directions
from prime_plugin.core.geometry import euler_to_matrix, matrix_to_euler
from prime_plugin.core.polar import PolarGrid, default_n_rot
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.search import PolarReferences
from prime_plugin.core.throughput import median_seconds

REPO = Path(__file__).resolve().parents[1]
SHARED_MAP = REPO.parent / "shared" / "data" / "ribosome70S_65px.mrc"
BOX, PIXEL_A = 64, 5.0

# A script run once per timing: project the angles of a STAR file and write the stack, as relion_project does.
# It prints the seconds from reading the map to the written stack, start-up and imports left out.
OURS = """
import sys, time, mrcfile, numba, numpy as np, starfile
numba.set_num_threads(int(sys.argv[4]))
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.projector import FourierProjector
started = time.perf_counter()
angles = starfile.read(sys.argv[2])["particles"][["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
images = FourierProjector(mrcfile.read(sys.argv[1])).project(euler_to_matrix(*angles.T))
with mrcfile.new(sys.argv[3], overwrite=True) as mrc:
    mrc.set_data(images)
print(time.perf_counter() - started)
"""


def reference_workload(volume, repeats):
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    projector = FourierProjector(volume)
    grid = PolarGrid(BOX, 2, 15, default_n_rot(29))
    directions, _ = asymmetric_unit_directions("C1", 4.5)  # what --nspace 2000 gives in C1
    rotations = euler_to_matrix(directions[:, 0], directions[:, 1], 0.0)
    kx, ky = (a.ravel() for a in grid.points())
    projector.sample(rotations[:2], kx, ky)  # compile outside the timing
    kernel_s = median_seconds(lambda: projector.sample(rotations, kx, ky), repeats)
    polar_s = median_seconds(lambda: PolarReferences.from_projector(projector, directions, grid), repeats)
    samples = len(rotations) * len(kx)
    print(f"1. reference sections of one half map: {len(rotations)} directions x {len(kx)} polar points "
          f"= {samples:,} samples, 2 threads")
    print(f"   FourierProjector.sample: {kernel_s:.3f} s ({samples / kernel_s / 1e6:.1f} M samples/s); "
          f"PolarReferences.from_projector: {polar_s:.3f} s")


def projection_comparison(volume, n, repeats):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        with mrcfile.new(folder / "map.mrc") as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = PIXEL_A
        angles = np.stack(matrix_to_euler(Rotation.random(n, random_state=5).as_matrix()), axis=1)
        optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [PIXEL_A], "rlnImageSize": [BOX],
                               "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                               "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
        particles = pd.DataFrame({"rlnImageName": [f"{i + 1}@dummy.mrcs" for i in range(n)], "rlnOpticsGroup": 1,
                                  "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1],
                                  "rlnAnglePsi": angles[:, 2]})
        starfile.write({"optics": optics, "particles": particles}, folder / "angles.star")
        (folder / "ours.py").write_text(OURS)
        commands = {"relion_project (1 thread)": ["relion_project", "--i", "map.mrc", "--ang", "angles.star",
                                                  "--o", "relion"],
                    "ours, 1 thread": [sys.executable, "ours.py", "map.mrc", "angles.star", "ours.mrcs", "1"],
                    "ours, 2 threads": [sys.executable, "ours.py", "map.mrc", "angles.star", "ours.mrcs", "2"]}
        for command in commands.values():  # warm caches (numba's compiled kernels, the file system)
            subprocess.run(command, cwd=folder, check=True, capture_output=True)
        times, inside = {name: [] for name in commands}, {name: [] for name in commands}
        for _ in range(repeats):
            for name, command in commands.items():
                started = time.perf_counter()
                done = subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True)
                times[name].append(time.perf_counter() - started)
                if name.startswith("ours"):
                    inside[name].append(float(done.stdout.split()[-1]))
        theirs = mrcfile.read(folder / "relion.mrcs").reshape(n, -1)
        ours = mrcfile.read(folder / "ours.mrcs").reshape(n, -1)
        centred = [a - a.mean(1, keepdims=True) for a in (theirs, ours)]
        correlation = (centred[0] * centred[1]).sum(1) / np.sqrt((centred[0] ** 2).sum(1) * (centred[1] ** 2).sum(1))
    relion_s = statistics.median(times["relion_project (1 thread)"])
    print(f"2. {n} projections of {BOX}^2 written to an MRC stack, whole command, median of {repeats}:")
    for name, values in times.items():
        median = statistics.median(values)
        line = f"   {name}: whole command {median:.2f} s (runs {', '.join(f'{v:.2f}' for v in values)})"
        if inside[name]:
            work = statistics.median(inside[name])
            line += (f"; reading, projecting and writing {work:.2f} s, the rest is Python's start-up and "
                     f"imports; relion_project's whole command / this: {relion_s / work:.2f}")
        print(line)
    print(f"   correlation ours vs RELION per image: median {np.median(correlation):.5f}, "
          f"minimum {correlation.min():.5f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="projections made by both programs (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    args = parser.parse_args()
    volume = np.ascontiguousarray(mrcfile.read(SHARED_MAP)[:BOX, :BOX, :BOX], dtype=np.float32)
    reference_workload(volume, args.repeats)
    projection_comparison(volume, args.n, args.repeats)


if __name__ == "__main__":
    main()
