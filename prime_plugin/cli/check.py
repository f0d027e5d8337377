"""Check that a particle data set (and optionally a reference map) can be refined.

Reads the STAR file (RELION 3.0 or 3.1), finds every image stack the way RELION
does (relative to the working directory, then to the STAR file's folder), checks
every image index and the box against the optics table, streams every pixel to
find NaN or infinite values, and checks that the reference map has the particles'
box. Prints a summary; writes nothing. Exit status 2 with a one-line error on the
first problem found.
"""

import numpy as np


def add_args(parser):
    parser.add_argument("--i", required=True, metavar="STAR", help="particle STAR file (RELION 3.0 or 3.1+)")
    parser.add_argument("--ref", default=None, metavar="MAP.mrc", help="reference map to check against the particles' box")
    parser.add_argument("--angpix", type=float, default=None, metavar="A",
                        help="pixel size in Angstrom, for 3.0 files that give neither magnification nor pixel size")


def main(args):
    from prime_plugin.core.images import ParticleImages
    from prime_plugin.core.mrc import read_volume
    from prime_plugin.core.star import read_particles

    table = read_particles(args.i, pixel_size_A=args.angpix)
    with ParticleImages(table) as images:
        for _ in images.chunks(chunk_size=256):
            pass  # read() raises on NaN/Inf pixels
        box = images.box
    if args.ref is not None:
        read_volume(args.ref, expected_box=box)
    pixel = np.unique(np.round(table.pixel_size_A, 6))
    print(f"{args.i}: {len(table)} particles, box {box} px, pixel size {', '.join(f'{p:g}' for p in pixel)} A, "
          f"{len(table.optics)} optics group(s), angles {'yes' if table.angles_deg is not None else 'no'}")
    if args.ref is not None:
        print(f"{args.ref}: {box}^3 map, matches the particles")
    return 0
