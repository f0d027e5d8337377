"""Simulate particle images of a map: a RELION 3.1 data set with known angles, shifts and CTF.

Writes DIR/particles.mrcs (float32 stack) and DIR/particles.star (data_optics +
data_particles; rlnAngleRot/Tilt/Psi in degrees, rlnOriginXAngst/YAngst in
Angstrom, rlnDefocusU/V in Angstrom), ready for relion_reconstruct or prime.

Orientations are uniform over all views (written in the asymmetric unit of
--sym), origins uniform in a disc of radius --shift_px pixels, defocus uniform in
--defocus MIN MAX micrometres (V = U minus up to 10%, random astigmatism angle).
--snr S: signal variance / noise variance over the whole box, with unit-variance
white noise; the signal scale is measured on the first 256 particles.

Pixel size: the images have the map's pixel size, read from its header or
given by --angpix (required when the header says 0; overrides the header).
--rescale_angpix A resamples the map to A Angstrom per pixel first (Fourier
cropping/padding; the box becomes round(box * old / A)). --box B then crops or
zero-pads the map (and the images) to B pixels in real space.
"""

import sys

from prime_plugin.cli.options import number


def add_args(parser):
    parser.add_argument("--map", required=True, metavar="MAP.mrc", help="cubic map to project")
    parser.add_argument("--n", required=True, type=int, metavar="N", help="number of particles")
    parser.add_argument("--o", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--angpix", type=number, default=None, metavar="A",
                        help="pixel size of the map in Angstrom (default: from its header)")
    parser.add_argument("--rescale_angpix", type=number, default=None, metavar="A",
                        help="resample the map to this pixel size in Angstrom first (default: keep it)")
    parser.add_argument("--box", type=int, default=None, metavar="B",
                        help="image box in pixels: crop or pad the map to it (default: the map's box)")
    parser.add_argument("--snr", type=number, default=None, metavar="S",
                        help="signal-to-noise ratio (variance ratio); default: noise-free")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    parser.add_argument("--sym", default="C1", metavar="G",
                        help="point group whose asymmetric unit holds the written angles (default C1)")
    parser.add_argument("--shift_px", type=number, default=0.0, metavar="R",
                        help="largest origin shift in pixels (uniform in a disc; default 0)")
    parser.add_argument("--defocus", type=number, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="defocus range in micrometres (e.g. 1 3); default: no CTF")
    parser.add_argument("--voltage", type=number, default=300.0, metavar="KV", help="voltage in kV (default 300)")
    parser.add_argument("--cs", type=number, default=2.7, metavar="MM", help="spherical aberration in mm (default 2.7)")
    parser.add_argument("--ac", type=number, default=0.1, metavar="Q0", help="amplitude contrast (default 0.1)")
    parser.add_argument("--overwrite", action="store_true", help="replace particles.star/.mrcs already in DIR")
    parser.add_argument("--j", type=int, default=None, metavar="T",
                        help="threads for the projection kernels (default: all cores)")


def main(args):
    from tqdm import tqdm

    from prime_plugin.core import memory
    from prime_plugin.core.errors import PrimeInputError
    from prime_plugin.core.mrc import read_volume
    from prime_plugin.core.resample import resample_volume
    from prime_plugin.core.simulate import simulate_particles
    from prime_plugin.core.validation import check_input_map

    if args.j is not None:
        if args.j < 1:
            raise PrimeInputError(f"--j must be >= 1, got {args.j}")
        import numba

        numba.set_num_threads(min(args.j, numba.config.NUMBA_NUM_THREADS))
    volume, header_A = read_volume(args.map)
    check_input_map(volume, args.map)
    if args.angpix is not None and not args.angpix > 0:
        raise PrimeInputError(f"--angpix must be a positive number of Angstrom, got {args.angpix:g}")
    pixel_A = args.angpix if args.angpix is not None else header_A
    if not pixel_A > 0:
        raise PrimeInputError("the map header gives no pixel size: give --angpix", args.map)
    if args.rescale_angpix is not None:
        if args.rescale_angpix > 0:
            memory.require({"resampling": memory.resample_bytes(volume.shape[0], pixel_A, args.rescale_angpix)},
                           f"resampling the map from {pixel_A:g} to {args.rescale_angpix:g} A/px",
                           "choose a larger --rescale_angpix", args.map)
        volume, pixel_A = resample_volume(volume, pixel_A, new_pixel_size_A=args.rescale_angpix)
    defocus = None if args.defocus is None else tuple(args.defocus)
    with tqdm(total=args.n, unit="image", file=sys.stderr, disable=args.n < 1000, leave=False) as bar:
        result = simulate_particles(
            volume, pixel_A, args.n, args.o, box=args.box, snr=args.snr, seed=args.seed, symmetry=args.sym,
            max_shift_px=args.shift_px, defocus_range_um=defocus, voltage_kV=args.voltage, cs_mm=args.cs,
            amplitude_contrast=args.ac, progress=bar.update, overwrite=args.overwrite)
    noise = "noise-free" if args.snr is None else f"SNR {args.snr:g}"
    ctf = "no CTF" if defocus is None else f"CTF, defocus {defocus[0]:g}-{defocus[1]:g} um"
    print(f"Wrote {result.star_path} and {result.stack_path.name}: {result.n} particles, box {result.box} px, "
          f"{result.pixel_size_A:g} A/px, {noise}, {ctf}, symmetry {args.sym}.")
    return 0
