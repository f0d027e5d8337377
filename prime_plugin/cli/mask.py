"""Make a soft solvent mask from a map (like relion_mask_create).

The map (optionally low-pass filtered first, --lowpass) is binarised at --threshold
(voxels at or above it, in the map's density units), the binary mask is extended by
--extend voxels (every voxel closer than that to it joins it; negative shrinks it),
and a raised-cosine soft edge --soft_edge voxels wide is added outside it. The mask is
1 on the particle and 0 in the solvent, float32, with the map's pixel size in its
header. Distances are in voxels (pixels), as in relion_mask_create.
"""

from pathlib import Path

from prime_plugin.cli.options import number


def add_args(parser):
    parser.add_argument("--i", required=True, metavar="MAP", help="input map (MRC) to threshold")
    parser.add_argument("--o", default="mask.mrc", metavar="MASK.mrc", help="output mask (default mask.mrc, as RELION)")
    parser.add_argument("--threshold", type=number, required=True, metavar="T",
                        help="density (map units) at or above which a voxel is in the initial binary mask "
                             "(RELION's --ini_threshold)")
    parser.add_argument("--extend", type=number, default=0.0, metavar="PX",
                        help="grow the binary mask by this many voxels; negative shrinks it (default 0; "
                             "RELION's --extend_inimask)")
    parser.add_argument("--soft_edge", type=number, default=0.0, metavar="PX",
                        help="width in voxels of the raised-cosine edge outside the mask (default 0; "
                             "RELION's --width_soft_edge)")
    parser.add_argument("--lowpass", type=number, default=None, metavar="A",
                        help="low-pass filter the map at this resolution in Angstrom before thresholding "
                             "(default none)")
    parser.add_argument("--angpix", type=number, default=None, metavar="A",
                        help="pixel size in Angstrom for --lowpass (default: the map's header)")


PARAMETER_NAMES = {"threshold": "--threshold", "extend_px": "--extend", "soft_edge_px": "--soft_edge",
                   "lowpass_A": "--lowpass"}


def main(args):
    from prime_plugin.core.errors import PrimeInputError
    from prime_plugin.core.masking import solvent_mask
    from prime_plugin.core.mrc import read_volume, write_volume
    from prime_plugin.core.validation import check_output_file

    output = Path(args.o)
    check_output_file(output)
    if output.resolve() == Path(args.i).resolve():
        raise PrimeInputError("is the input map: refusing to overwrite it with its mask; give another --o", args.o)
    volume, header_apix = read_volume(args.i)
    pixel_size_A = header_apix if args.angpix is None else args.angpix
    if args.lowpass is not None and not pixel_size_A > 0:
        raise PrimeInputError("the header gives no pixel size for --lowpass; give --angpix", args.i)
    try:
        mask = solvent_mask(volume, pixel_size_A, args.threshold, extend_px=args.extend,
                            soft_edge_px=args.soft_edge, lowpass_A=args.lowpass)
    except PrimeInputError as error:
        if error.path is None:
            raise PrimeInputError(error.problem, args.i, error.parameter) from None
        raise
    write_volume(output, mask, pixel_size_A if pixel_size_A > 0 else 1.0)
    inside = float((mask > 0.5).mean())
    print(f"{args.o}: {mask.shape[0]}^3 mask, {100 * inside:.1f}% of the box above 0.5 "
          f"(threshold {args.threshold:g}, extended {args.extend:g} px, soft edge {args.soft_edge:g} px)")
    return 0
