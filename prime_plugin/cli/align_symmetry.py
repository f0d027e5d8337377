"""Rotate a map so that its symmetry axes lie where RELION puts them for --sym (like relion_align_symmetry).

The map (any orientation) is moved so that its centre of mass is at the box centre (unless
--keep_centre), its axes of point group --sym are found (a global search on a small low-passed
copy, then a local refinement; prime_plugin.core.symmetry_search) and it is rotated so that
RELION's operators for --sym hold: C<n> and D<n> about z with D's first 2-fold on x, T, O, I
as relion_refine --print_symmetry_ops lists them. The rotation is printed as RELION's Euler
angles (rot, tilt, psi; degrees) with the correlation of the aligned map with its average over
the group (1 for a perfectly symmetric map). --apply_sym writes that average instead.
"""

from pathlib import Path

from prime_plugin.cli.options import number


def add_args(parser):
    parser.add_argument("--i", required=True, metavar="MAP", help="input map (MRC), any orientation")
    parser.add_argument("--o", default="aligned.mrc", metavar="MAP",
                        help="output map (default aligned.mrc, as RELION)")
    parser.add_argument("--sym", required=True, metavar="G", help="point group: C<n>, D<n>, T, O or I")
    parser.add_argument("--angpix", type=number, default=None, metavar="A",
                        help="pixel size in Angstrom (default: the map's header)")
    parser.add_argument("--maxres", type=number, default=None, metavar="A",
                        help="search with the map low-passed to this resolution in Angstrom "
                             "(default: the working box's Nyquist)")
    parser.add_argument("--box_size", type=int, default=40, metavar="PX",
                        help="largest working box of the search in voxels (default 40)")
    parser.add_argument("--keep_centre", action="store_true",
                        help="do not move the centre of mass to the box centre first")
    parser.add_argument("--apply_sym", action="store_true",
                        help="write the aligned map averaged over the group")


PARAMETER_NAMES = {"resolution_A": "--maxres", "max_box": "--box_size"}


def main(args):
    from prime_plugin.core.errors import PrimeInputError
    from prime_plugin.core.mrc import read_volume, write_volume
    from prime_plugin.core.symmetry import symmetry_operators
    from prime_plugin.core.symmetry_search import find_symmetry_axes
    from prime_plugin.core.validation import check_output_file, check_result_map

    symmetry_operators(args.sym)  # an unknown group is refused before anything is read
    output = Path(args.o)
    check_output_file(output)
    volume, header_apix = read_volume(args.i)
    pixel_size_A = header_apix if args.angpix is None else args.angpix
    if args.angpix is None and not pixel_size_A > 0:
        raise PrimeInputError("the header gives no pixel size; give --angpix", args.i)
    try:
        found = find_symmetry_axes(volume, pixel_size_A, args.sym, resolution_A=args.maxres, max_box=args.box_size,
                                   recentre=not args.keep_centre, apply_symmetry=args.apply_sym)
    except PrimeInputError as error:
        if error.path is None and error.parameter is None:
            raise PrimeInputError(error.problem, args.i) from None  # a problem of the map: name its file
        raise
    check_result_map(found.volume, "the aligned map")
    write_volume(output, found.volume, pixel_size_A)
    rot, tilt, psi = found.euler_deg
    moved = ", ".join(f"{s:.2f}" for s in found.shift_px)
    print(f"{args.o}: {args.sym} axes found at rot {rot:.2f} tilt {tilt:.2f} psi {psi:.2f} deg (RELION's angles of "
          f"the rotation applied); correlation with its {args.sym} average {found.score:.3f}; centre moved by "
          f"({moved}) px; searched at {found.working_pixel_size_A:.2f} A/px, box {found.working_box}"
          f"{'; symmetrised' if args.apply_sym else ''}")
    return 0
