"""Mask-corrected resolution and sharpening of two half maps (like relion_postprocess).

Computes the FSC between the half maps without and with the mask, and the FSC
corrected for the mask by phase randomisation (Chen et al. 2013, as RELION); the
final resolution is where the corrected FSC drops below 0.143. The average of the
half maps is weighted by sqrt(2 FSC / (1 + FSC)) per Fourier shell, sharpened by a
B-factor (A^2; --auto_bfac fits it to the Guinier plot between --autob_lowres and the
final resolution, B = 4 x slope; or --adhoc_bfac, negative sharpens; neither: 0) and
low-pass filtered at the final resolution (--low_pass). Writes into --o:
postprocess.mrc (sharpened), postprocess_masked.mrc (times the mask), postprocess.star
(RELION's data_general, data_fsc, data_guinier blocks), fsc.png and guinier.png.
--locres adds local resolution as relion_postprocess --locres measures it (the corrected FSC
in soft spheres on a grid --locres_sampling apart): postprocess_locres.mrc (the local
resolution in Angstrom) and postprocess_locres_filtered.mrc (the average map, sharpened by
the B-factor, filtered to the local resolution).
All resolutions are in Angstrom. Post-processed half maps and MTF correction are not done.
"""

import sys
from pathlib import Path

import numpy as np

from prime_plugin.cli.options import number


def add_args(parser):
    parser.add_argument("--i", required=True, metavar="HALF1", help="half map 1 (MRC), unmasked")
    parser.add_argument("--i2", default=None, metavar="HALF2",
                        help="half map 2 (default: --i with 'half1' replaced by 'half2' in the file name, as RELION)")
    parser.add_argument("--mask", required=True, metavar="MASK",
                        help="solvent mask (MRC, values in [0, 1], 1 = particle; e.g. from prime mask)")
    parser.add_argument("--o", default="PostProcess", metavar="FOLDER", help="output folder (default PostProcess)")
    bfactor = parser.add_mutually_exclusive_group()
    bfactor.add_argument("--auto_bfac", action="store_true",
                         help="fit the B-factor to the Guinier plot (Rosenthal & Henderson 2003)")
    bfactor.add_argument("--adhoc_bfac", type=number, default=None, metavar="B",
                         help="B-factor in A^2 to apply (negative sharpens, e.g. -100); default 0 without --auto_bfac")
    parser.add_argument("--autob_lowres", type=number, default=10.0, metavar="A",
                        help="lowest resolution in Angstrom in the B-factor fit (default 10)")
    parser.add_argument("--autob_highres", type=number, default=None, metavar="A",
                        help="highest resolution in Angstrom in the B-factor fit (default: the final resolution; "
                             "0: up to Nyquist, RELION 3.1's default)")
    parser.add_argument("--low_pass", type=number, default=None, metavar="A",
                        help="low-pass filter the map at this resolution in Angstrom (default: the final "
                             "resolution; 0: no filter, RELION 3.1's default)")
    parser.add_argument("--angpix", type=number, default=None, metavar="A",
                        help="pixel size in Angstrom (default: half map 1's header)")
    parser.add_argument("--force_mask", action="store_true",
                        help="keep the mask-corrected FSC even where the unmasked FSC reaches further (RELION's)")
    parser.add_argument("--random_seed", type=int, default=0, metavar="N",
                        help="seed of the random phases (default 0, as RELION)")
    locres = parser.add_argument_group("local resolution (relion_postprocess --locres)")
    locres.add_argument("--locres", action="store_true",
                        help="estimate local resolution: postprocess_locres.mrc and postprocess_locres_filtered.mrc")
    locres.add_argument("--locres_sampling", type=number, default=25.0, metavar="A",
                        help="spacing of the spheres' centres in Angstrom (default 25)")
    locres.add_argument("--locres_maskrad", type=number, default=None, metavar="A",
                        help="radius of the spheres in Angstrom (default half the sampling)")
    locres.add_argument("--locres_edgwidth", type=number, default=None, metavar="A",
                        help="width of the spheres' soft edge in Angstrom (default the sampling)")
    locres.add_argument("--locres_randomize_at", type=number, default=25.0, metavar="A",
                        help="randomise phases from this resolution in Angstrom (default 25)")
    locres.add_argument("--locres_minres", type=number, default=50.0, metavar="A",
                        help="lowest local resolution reported, in Angstrom (default 50)")


PARAMETER_NAMES = {"autob_lowres_A": "--autob_lowres", "autob_highres_A": "--autob_highres",
                   "low_pass_A": "--low_pass", "bfactor": "--adhoc_bfac", "sampling_A": "--locres_sampling",
                   "radius_A": "--locres_maskrad", "edge_A": "--locres_edgwidth",
                   "randomise_at_A": "--locres_randomize_at", "min_resolution_A": "--locres_minres"}


def main(args):
    from prime_plugin.core.errors import PrimeInputError
    from prime_plugin.core.postprocess import postprocess
    from prime_plugin.core.local_resolution import local_resolution
    from prime_plugin.core.postprocess_files import (LOCRES_NAMES, OUTPUT_NAMES, other_half_name,
                                                     read_postprocess_inputs, write_postprocess_outputs)
    from prime_plugin.core.validation import check_output_folder

    half2_path = args.i2 if args.i2 is not None else other_half_name(args.i)
    if half2_path is None:
        raise PrimeInputError("the file name holds neither 'half1' nor 'half2': give half map 2 with --i2", args.i)
    check_output_folder(args.o)
    for name in OUTPUT_NAMES + (LOCRES_NAMES if args.locres else ()):
        if (Path(args.o) / name).is_dir():
            raise PrimeInputError("is a folder, where an output file goes", Path(args.o) / name)
    inputs = read_postprocess_inputs(args.i, half2_path, args.mask, args.angpix)
    bfactor = "auto" if args.auto_bfac else (args.adhoc_bfac or 0.0)
    try:
        result = postprocess(inputs.half1, inputs.half2, inputs.mask, inputs.pixel_size_A, bfactor=bfactor,
                             autob_lowres_A=args.autob_lowres, autob_highres_A=args.autob_highres,
                             low_pass_A=args.low_pass, force_mask=args.force_mask, rng=args.random_seed)
    except PrimeInputError as error:
        if error.path is not None or error.parameter is not None:
            raise
        raise PrimeInputError(f"{error.problem} (half maps {args.i} and {half2_path})") from None
    local = None
    if args.locres:
        local = local_resolution(inputs.half1, inputs.half2, inputs.pixel_size_A, sampling_A=args.locres_sampling,
                                 radius_A=args.locres_maskrad, edge_A=args.locres_edgwidth,
                                 randomise_at_A=args.locres_randomize_at, min_resolution_A=args.locres_minres,
                                 bfactor_A2=result.bfactor_A2, rng=args.random_seed)
    for line in inputs.warnings + result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    write_postprocess_outputs(args.o, result, args.i, half2_path, args.mask, local=local)
    curves = result.fsc
    print(f"{args.o}: {inputs.half1.shape[0]}^3 at {inputs.pixel_size_A:g} A/px; phases randomised beyond "
          f"{curves.randomise_from_A:.2f} A")
    print(f"resolution (FSC = 0.143): unmasked {curves.res_unmasked_A:.2f} A, masked {curves.res_masked_A:.2f} A, "
          f"corrected {curves.res_corrected_A:.2f} A")
    if result.fit is not None:
        up_to = f"{result.fit.highres_A:.2f} A" if result.fit.highres_A > 0 else "Nyquist"
        print(f"B-factor fit {result.fit.lowres_A:g} A to {up_to} over {result.fit.n_shells} shells: "
              f"slope {result.fit.slope:.1f} A^2, correlation {result.fit.correlation:.3f}")
    low_pass = "none" if result.low_pass_A is None else f"{result.low_pass_A:.2f} A"
    print(f"FINAL RESOLUTION: {result.resolution_A:.2f} A; B-factor {result.bfactor_A2:.1f} A^2; low-pass {low_pass}")
    if local is not None:
        inside = local.resolution_A[inputs.mask > 0.5]
        print(f"local resolution in {len(local.centres_px)} spheres ({local.radius_px} px + {local.edge_px} px edge, "
              f"{local.step_px} px apart): inside the mask median {np.median(inside):.2f} A, 5-95% "
              f"{np.percentile(inside, 5):.2f}-{np.percentile(inside, 95):.2f} A")
    return 0
