"""Convert a RELION 3.0 or 3.1 particle STAR file to the RELION 3.1 layout.

Like relion_convert_star: a 3.0 file (rlnOriginX/Y in pixels, rlnMagnification and
rlnDetectorPixelSize in um) gets an optics table (one group per distinct voltage,
Cs, amplitude contrast and pixel size) and shifts in Angstrom (rlnOriginXAngst/YAngst).
A 3.1 file is rewritten unchanged in meaning. Every other column and block is kept.
"""

from pathlib import Path

from prime_plugin.cli.options import number
from prime_plugin.core.errors import PrimeInputError


def add_args(parser):
    parser.add_argument("--i", required=True, metavar="IN.star", help="input particle STAR file (RELION 3.0 or 3.1+)")
    parser.add_argument("--o", required=True, metavar="OUT.star", help="output STAR file, RELION 3.1 layout")
    parser.add_argument("--angpix", type=number, default=None, metavar="A",
                        help="pixel size in Angstrom, for 3.0 files that give neither magnification nor pixel size")


def main(args):
    from prime_plugin.core.star import read_particles, write_particles
    from prime_plugin.core.validation import check_output_file, check_particle_values

    if Path(args.o).resolve() == Path(args.i).resolve():
        raise PrimeInputError("refusing to overwrite the input; choose another --o", args.o)
    table = read_particles(args.i, pixel_size_A=args.angpix)
    check_particle_values(table)
    check_output_file(args.o)
    write_particles(table, args.o)
    groups = len(table.optics)
    origin = "RELION 3.0, converted" if table.converted_from_30 else "RELION 3.1"
    print(f"Wrote {args.o}: {len(table)} particles, {groups} optics group(s) ({origin}).")
    return 0
