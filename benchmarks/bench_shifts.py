"""Origin refinement: L-BFGS-B with the analytical gradient against scipy's Nelder-Mead.

    python benchmarks/bench_shifts.py [--n 200] [--repeats 3]

Simulates particles of the ribosome map (box 64, 5 A/px, SNR 0.1, astigmatic CTF
1-3 um, origins up to 4 px) with `prime simulate`'s engine, puts each particle on its
true projection direction, and refines its origin from (0, 0) within +/- 4.5 px with
both methods (each interleaved with the exhaustive psi search, as the engine does).
Prints the median wall time per particle, the median final correlation and the median
number of objective evaluations of each, medians over --repeats runs.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

from prime_plugin.core.ctf import CtfParams
from prime_plugin.core.directions import asymmetric_unit_directions
from prime_plugin.core.geometry import projection_direction
from prime_plugin.core.images import ParticleImages
from prime_plugin.core.polar import PolarGrid, default_n_rot, normalise_and_mask, particle_sections
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.search import PolarReferences
from prime_plugin.core.shifts import refine_shift
from prime_plugin.core.simulate import simulate_particles
from prime_plugin.core.star import read_particles

SHARED_MAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "ribosome70S_65px.mrc"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    volume = np.ascontiguousarray(mrcfile.read(SHARED_MAP)[:64, :64, :64])
    with tempfile.TemporaryDirectory() as folder:
        simulated = simulate_particles(volume, 5.0, args.n, folder, snr=0.1, seed=3, max_shift_px=4.0,
                                       defocus_range_um=(1.0, 3.0))
        table = read_particles(simulated.star_path)
        with ParticleImages(table) as images:
            stack = images.read(np.arange(len(table)))
    grid = PolarGrid(64, 2, 18, default_n_rot(28))
    directions, _ = asymmetric_unit_directions("C1", 5.0)
    references = PolarReferences.from_projector(FourierProjector(volume), directions, grid)
    ctf = CtfParams.from_star(table.particles_with_optics())
    particles = particle_sections(normalise_and_mask(stack, 28), grid, ctf=ctf, pixel_size_A=5.0)
    angles = table.angles_deg
    nearest = (projection_direction(angles[:, 0], angles[:, 1])
               @ projection_direction(directions[:, 0], directions[:, 1]).T).argmax(1)
    figures = {}
    for method in ("L-BFGS-B", "Nelder-Mead"):
        runs = []
        for _ in range(args.repeats):
            values, evaluations = [], []
            started = time.perf_counter()
            for i, j in enumerate(nearest):
                norm = float(np.sqrt((references.powers[j] * particles.ctf2[i]).sum() * particles.powers[i].sum()))
                _, _, value, count = refine_shift(references.sections[j], particles.sections[i], norm, grid,
                                                  np.zeros(2), 4.5, method=method)
                values.append(value)
                evaluations.append(count)
            runs.append(((time.perf_counter() - started) / len(nearest), np.median(values), np.median(evaluations)))
        seconds, value, count = (float(np.median([r[k] for r in runs])) for k in range(3))
        figures[method] = {"ms_per_particle": round(1e3 * seconds, 3), "median_correlation": round(value, 6),
                           "median_evaluations": count}
    figures["speedup"] = round(figures["Nelder-Mead"]["ms_per_particle"] / figures["L-BFGS-B"]["ms_per_particle"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
