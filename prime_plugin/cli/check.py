"""Check that a particle data set (and optionally a reference map) can be refined and reconstructed.

Runs the checks prime refine and prime reconstruct run before they start (the same code):
reads the STAR file (RELION 3.0 or 3.1), checks every value the engine uses (finite, in
its physical range: pixel size, voltage, Cs, defocus, angles, origins within the image),
finds every image stack the way RELION does (relative to the working directory, then to
the STAR file's folder), checks every image index and the box against the optics table,
and reads every image once to find NaN, infinite or blank ones. With --ref, checks the
reference as prime refine takes it (resampled to the particles' pixel size and box when
its header allows). Then says what prime refine (with --sym and --nspace, and the memory it
would need here) and prime reconstruct would do with the data. Writes nothing. Exit status 2
with a one-line error on the first problem found.
"""

from prime_plugin.cli.options import number


def add_args(parser):
    parser.add_argument("--i", required=True, metavar="STAR", help="particle STAR file (RELION 3.0 or 3.1+)")
    parser.add_argument("--ref", default=None, metavar="MAP.mrc",
                        help="reference map to check as prime refine takes it")
    parser.add_argument("--angpix", type=number, default=None, metavar="A",
                        help="pixel size in Angstrom, for 3.0 files that give neither magnification nor pixel size")
    parser.add_argument("--sym", default="C1", metavar="G", help="point group prime refine would use (default C1)")
    parser.add_argument("--nspace", type=int, default=4000, metavar="N",
                        help="projection directions prime refine would use, for its memory estimate (default 4000)")


def main(args):
    from prime_plugin.core.symmetry import symmetry_operators
    from prime_plugin.core.validation import open_particles, reference_for

    operators = symmetry_operators(args.sym)
    data = open_particles(args.i, args.angpix, scan=True)
    table, box, apix = data.table, data.images.box, data.pixel_size_A
    data.images.close()
    plan = None if args.ref is None else reference_for(args.ref, box, apix)
    print(f"{args.i}: {len(table)} particles, box {box} px, pixel size {apix:g} A, {len(table.optics)} optics "
          f"group(s), angles {'yes' if table.angles_deg is not None else 'no'}; every value in range, every image "
          "read (none NaN, infinite or blank)")
    if plan is not None:
        what = (f"resampled from {plan.pixel_size_A:g} A/px to the particles' {apix:g} A/px and box {box}"
                if plan.resample else "matches the particles")
        print(f"{args.ref}: {plan.volume.shape[0]}^3 map, {what}")
    print(f"prime refine: {_refine_outlook(args, data, len(operators))}")
    print(f"prime reconstruct: {_reconstruct_outlook(table, args.i)}")
    return 0


def _has_ctf(table, path):
    """None if the CTF parameters are complete and valid, else what is missing (PrimeInputError text)."""
    from prime_plugin.core.ctf import CtfParams
    from prime_plugin.core.errors import PrimeInputError

    try:
        CtfParams.from_star(table.particles_with_optics(), path)
    except PrimeInputError as error:
        return error.problem
    return None


def _refine_outlook(args, data, symmetry_order):
    from prime_plugin.core import memory
    from prime_plugin.core.polar import default_n_rot
    from prime_plugin.core.refine_setup import MIN_PARTICLES_PER_HALF
    from prime_plugin.core.star_reconstruction import half_sets

    table, box = data.table, data.images.box
    notes = []
    no_ctf = _has_ctf(table, args.i)
    notes.append("CTF correction on" if no_ctf is None else f"needs --no_ctf ({no_ctf})")
    if "rlnRandomSubset" in table.particles.columns:
        half = half_sets(table, args.i)
        sizes = [int((half == h).sum()) for h in (1, 2)]
    else:
        sizes = [(len(table) + 1) // 2, len(table) // 2]
    if min(sizes) < MIN_PARTICLES_PER_HALF:
        notes.append(f"refuses the half-sets of {sizes[0]} and {sizes[1]} particles (at least "
                     f"{MIN_PARTICLES_PER_HALF} in each)")
    needed = sum(memory.refine_bytes(box, len(table), args.nspace, default_n_rot(0.45 * box), symmetry_order).values())
    available = memory.available_bytes()
    room = "" if available is None else f" of the {memory.gigabytes(available)} available"
    too_much = available is not None and needed > available
    notes.append(f"about {memory.gigabytes(needed)} of memory{room} at --nspace {args.nspace}"
                 f"{' (too much: lower --nspace)' if too_much else ''}")
    return "; ".join(notes)


def _reconstruct_outlook(table, path):
    if table.angles_deg is None:
        return "needs angles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi)"
    no_ctf = _has_ctf(table, path)
    return "ready, " + ("--ctf possible" if no_ctf is None else f"without --ctf only ({no_ctf})")

