"""Reconstruct a map from particles at their orientations in a STAR file (like relion_reconstruct).

Reads a RELION 3.0 or 3.1+ particle STAR file with angles (rlnAngleRot, rlnAngleTilt,
rlnAnglePsi, degrees) and origins (rlnOriginXAngst/YAngst), streams the images in
chunks, and inserts them into the Fourier sums of their half-set (rlnRandomSubset,
or alternating rows when absent). Every stack is checked before any work starts.
The map from both halves is Wiener-regularised with the FSC between the half maps;
that FSC's 0.143 resolution is printed. With --subset only that half is read, as in
RELION, and the map gets a tiny fixed regulariser (no FSC without the other half).
All particles must share one pixel size. The map is written atomically with the
pixel size in its header.
"""

import sys
from pathlib import Path

from prime_plugin.cli.options import number


def add_args(parser):
    parser.add_argument("--i", required=True, metavar="STAR", help="particle STAR file with angles (RELION 3.0 or 3.1+)")
    parser.add_argument("--o", default="relion.mrc", metavar="MAP.mrc", help="output map (default relion.mrc, as RELION)")
    parser.add_argument("--sym", default="C1", metavar="G", help="point group: C<n>, D<n>, T, O, I (default C1)")
    parser.add_argument("--ctf", action="store_true", help="correct for the CTF (needs the CTF columns)")
    parser.add_argument("--subset", type=int, default=None, metavar="1|2",
                        help="reconstruct only half-set 1 or 2 (rlnRandomSubset); default both")
    parser.add_argument("--maxres", type=number, default=None, metavar="A",
                        help="highest resolution to use, in Angstrom (default Nyquist)")
    parser.add_argument("--angpix", type=number, default=None, metavar="A",
                        help="pixel size in Angstrom for RELION 3.0 files that carry none (must match the images)")
    parser.add_argument("--j", type=int, default=None, metavar="N", help="threads (default all cores)")


PARAMETER_NAMES = {"max_resolution_A": "--maxres"}


def main(args):
    from prime_plugin.core.atomic_files import temporary_target
    from prime_plugin.core.mrc import write_volume
    from prime_plugin.core.star_reconstruction import reconstruct_particles
    from prime_plugin.core.validation import check_output_file, check_result_map

    output = Path(args.o)
    check_output_file(output)
    result = reconstruct_particles(args.i, ctf=args.ctf, symmetry=args.sym, subset=args.subset,
                                   max_resolution_A=args.maxres, pixel_size_A=args.angpix, threads=args.j,
                                   progress=_Progress() if sys.stderr.isatty() else None)
    check_result_map(result.volume, f"the map for {output}")
    for left in output.absolute().parent.glob(f".{output.name}.*"):  # a killed run's temporaries
        if temporary_target(left.name) == output.name:
            left.unlink(missing_ok=True)
    write_volume(output, result.volume, result.pixel_size_A)
    halves = "both half-sets" if args.subset is None else f"half-set {args.subset}"
    print(f"{args.o}: {result.volume.shape[0]}^3 map at {result.pixel_size_A:g} A/px from "
          f"{result.n_particles} particles ({halves}, symmetry {args.sym.upper()}, CTF {'on' if args.ctf else 'off'})")
    if result.resolution_A is not None:
        print(f"resolution (FSC = 0.143 between the half maps): {result.resolution_A:.2f} A")
    return 0


class _Progress:
    """Prints 'inserted k / n particles' on one terminal line."""

    def __call__(self, done, total):
        end = "\n" if done >= total else ""
        print(f"\rinserted {done} / {total} particles", end=end, file=sys.stderr, flush=True)
