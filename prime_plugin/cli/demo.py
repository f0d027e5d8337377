"""Run the demonstration: simulate a small data set, refine it, and show where the results are.

Uses the beta-galactosidase map shipped with the package (64^3 at 3.6 A/px, made from
PDB 5A1A, D2 symmetry): simulates --n particles with random orientations, origins up to
3 px, astigmatic CTFs (defocus 1-2.5 um) and noise (SNR 0.1), writes them as a RELION
3.1 data set without their angles, and refines them with `prime refine --sym D2` from
the map low-passed to 40 A. Takes a few minutes on a laptop. Prints the resolution, the
angular error against the simulated truth, and where the maps, STAR files and plots are.
"""

import sys
from pathlib import Path


def add_args(parser):
    parser.add_argument("--o", default="prime_demo", metavar="DIR", help="output folder (default: prime_demo)")
    parser.add_argument("--n", type=int, default=2000, metavar="N", help="particles to simulate (default 2000)")
    parser.add_argument("--j", type=int, default=None, metavar="THREADS", help="threads (default: all cores)")
    parser.add_argument("--force", action="store_true", help="replace a previous demo in --o")


def main(args):
    import numpy as np

    from prime_plugin.core.errors import PrimeInputError
    from prime_plugin.core.geometry import euler_to_matrix, rotation_angles_deg
    from prime_plugin.core.mrc import read_volume
    from prime_plugin.core.refine import RefineParameters, refine
    from prime_plugin.core.simulate import simulate_particles
    from prime_plugin.core.star import read_particles, write_particles
    from prime_plugin.core.symmetry import symmetry_operators

    out = Path(args.o)
    if (out / "Refine").exists() and not args.force:
        raise PrimeInputError("already holds a demo; use --force to replace it", out)
    if args.n < 200:
        raise PrimeInputError(f"--n must be at least 200 for a meaningful demo, got {args.n}")
    volume, pixel_size_A = read_volume(Path(__file__).resolve().parents[1] / "data" / "betagal_d2_64.mrc")
    print(f"1/2 Simulating {args.n} particles of beta-galactosidase (D2, 64 px, {pixel_size_A:g} A/px) in {out / 'Data'}")
    simulated = simulate_particles(volume, pixel_size_A, args.n, out / "Data", snr=0.1, seed=1, symmetry="D2",
                                   max_shift_px=3.0, defocus_range_um=(1.0, 2.5), overwrite=True)
    truth = read_particles(simulated.star_path)
    blind = truth.particles.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                                          "rlnOriginYAngst"])
    write_particles(type(truth)(blind, truth.optics, {}, truth.source), out / "Data" / "particles_no_angles.star")
    print("2/2 Refining them from the map low-passed to 40 A (prime refine --sym D2)")
    params = RefineParameters(str(out / "Data" / "particles_no_angles.star"), str(out / "Data" / "start.mrc"),
                              str(out / "Refine"), symmetry="D2", particle_diameter_A=200, update_fraction=0.2,
                              max_iter=15, n_space=2000, threads=args.j)  # half the default: a quick demo
    from prime_plugin.core.mrc import write_volume

    write_volume(params.reference, volume, pixel_size_A)
    from prime_plugin.cli.refine import _start_log

    result = refine(params, prepared=lambda: _start_log(out / "Refine", False), on_iteration=lambda f: print(
        f"   iteration {f['iteration']:2d}: {f['resolution_A']:5.1f} A, {100 * f['fraction_visited']:3.0f}% of "
        f"the directions visited, {f['seconds']:.0f} s", file=sys.stderr))
    errors = rotation_angles_deg(euler_to_matrix(*truth.angles_deg.T), euler_to_matrix(*result.state.angles_deg.T),
                                 symmetry_operators("D2"))
    print(f"Done: gold-standard resolution {result.resolution_A:.1f} A (Nyquist {2 * pixel_size_A:.1f} A), median "
          f"orientation error against the simulated truth {np.median(errors):.1f} degrees.")
    print(f"Look at: {out / 'Refine' / 'run_class001.mrc'} (the map, e.g. in ChimeraX), "
          f"{out / 'Refine' / 'run_data.star'} (the particles), {out / 'Refine' / 'fsc.png'}, "
          f"{out / 'Refine' / 'angdist.png'} and {out / 'Refine' / 'convergence.png'} (plots), "
          f"{out / 'Refine' / 'run.log'}.")
    return 0
