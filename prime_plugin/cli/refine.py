"""Refine particle orientations and a 3D map by PRIME stochastic hill climbing (gold standard).

Give the particles (a RELION 3.0 or 3.1 STAR file with CTF parameters) and a starting
map; the particles are split into two half-sets (rlnRandomSubset, or a seeded random
split that is written out), each refined against its own half map. The first iteration
searches every particle; each later one searches a fraction of them (--update_frac,
incremental learning) against its half map without their own previous contribution. The
correlation weighs each Fourier ring by the noise power of the particle's micrograph. The
alignment is limited to the resolution where the half maps still agree, and the run stops
when the orientations and the resolution no longer change, or at --max_iter. Each iteration
works on the particles Fourier-cropped to the box its resolution needs (the resolution plus
10 Fourier pixels; run.log names it), and the final maps are written at the full box.

Outputs in --o, named as RELION's Refine3D job names them: run_data.star,
run_half1_class001_unfil.mrc, run_half2_class001_unfil.mrc, run_class001.mrc,
run_model.star, run_itNNN_* per iteration; plus run_posterior.star (the best
orientations of every particle with their weights), fsc.png, angdist.png,
convergence.png and run.log.

--continue checks that the inputs are those the run started with (the STAR file's and
the maps' contents, and every option that changes the result) and says which differs.
A run stopped by Ctrl-C or SIGTERM keeps its last complete iteration; a run that fails
or is stopped before its first complete iteration can simply be run again. --force
removes every file an earlier run wrote in --o (and only those) before starting.
"""

import logging
import sys
from pathlib import Path

from prime_plugin.cli.options import number

RUN_MARKER = "run.log"
# The engine's parameters (RefineParameters) in this command's words, for its messages.
PARAMETER_NAMES = {"particles": "--i", "reference": "--ref", "symmetry": "--sym",
                   "particle_diameter_A": "--particle_diameter", "ini_high_A": "--ini_high",
                   "solvent_mask": "--solvent_mask", "pixel_size_A": "--angpix", "update_fraction": "--update_frac",
                   "n_space": "--nspace", "trs_px": "--trs", "n_peaks": "--npeaks", "sigma": "--sigma",
                   "seed": "--seed", "max_iter": "--max_iter", "threads": "--j", "ctf=False": "--no_ctf",
                   "local_sigma_deg": "--sigma_ang"}
DEFAULT_SIGMA_ANG_DEG = 3.0
NEGATED_FLAGS = {"subgrid": "--no_subgrid", "ctf": "--no_ctf"}  # RefineParameters booleans set False by a flag


def add_args(parser):
    io = parser.add_argument_group("input and output")
    io.add_argument("--i", required=True, metavar="STAR", help="particle STAR file (RELION 3.0 or 3.1+)")
    io.add_argument("--ref", required=True, metavar="MAP.mrc",
                    help="starting map; resampled to the particles' pixel size and box if needed")
    io.add_argument("--o", required=True, metavar="DIR", help="output folder")
    io.add_argument("--continue", dest="resume", action="store_true",
                    help="continue an interrupted run in --o from its last complete iteration")
    io.add_argument("--force", action="store_true", help="overwrite a previous run in --o")
    model = parser.add_argument_group("sample")
    model.add_argument("--sym", default="C1", metavar="G", help="point group: C<n>, D<n>, T, O or I (default C1)")
    model.add_argument("--particle_diameter", type=number, default=None, metavar="A",
                       help="particle diameter in Angstrom: sets the circular mask (default 90%% of the box)")
    model.add_argument("--ini_high", type=number, default=40.0, metavar="A",
                       help="low-pass the starting map to this resolution in Angstrom; the first "
                            "iteration aligns up to it (default 40)")
    model.add_argument("--solvent_mask", default=None, metavar="MASK.mrc",
                       help="soft mask (0..1, the particles' box) for the references and the FSC "
                            "(default: a soft sphere of the particle diameter); run.log gives the "
                            "masked and unmasked resolutions")
    model.add_argument("--angpix", type=number, default=None, metavar="A",
                       help="pixel size in Angstrom, for RELION 3.0 files that give none")
    model.add_argument("--no_ctf", action="store_true",
                       help="refine without CTF correction (by default the particles must carry CTF parameters: "
                            "rlnDefocusU, rlnDefocusV, rlnDefocusAngle and the optics' voltage, Cs and "
                            "amplitude contrast)")
    search = parser.add_argument_group("search")
    search.add_argument("--update_frac", type=number, default=0.2, metavar="F",
                        help="fraction of the particles searched per iteration after the first, which searches "
                             "them all, 0 < F <= 1 (default 0.2; 1 = classic batch refinement)")
    search.add_argument("--search", default="greedy", choices=["greedy", "shc"],
                        help="greedy (default): every search scores a coarse grid of directions, as fine as "
                             "the current resolution needs, at every origin offset, then climbs to the best "
                             "neighbouring direction; shc: stochastic hill climbing from the previous "
                             "orientation (PRIME's original: faster, but on real particles it leaves more of "
                             "them in wrong orientations, see benchmarks/RESULTS.md)")
    search.add_argument("--local", action="store_true",
                        help="local refinement: every search stays near the orientation and origin the particle "
                             "has in --i (rlnAngleRot/Tilt/Psi, needed, and rlnOriginX/YAngst), for a step after "
                             "another refinement or a classification; nothing else is scored, so it is much "
                             "faster than a global search and cannot jump to an unrelated orientation")
    search.add_argument("--sigma_ang", type=number, default=None, metavar="DEG",
                        help="with --local: the expected angular error of the input orientations in degrees "
                             "(RELION's --sigma_ang); the search scores the orientations within 3 times this "
                             f"angle (default {DEFAULT_SIGMA_ANG_DEG:g})")
    search.add_argument("--no_noise_model", action="store_true",
                        help="correlate without weighting each Fourier ring by the noise power of the "
                             "particle's micrograph (estimated from the data); by default the weighting is on")
    search.add_argument("--nspace", type=int, default=4000, metavar="N",
                        help="projection directions in the asymmetric unit (default 4000, ~3.2 degrees apart in C1; "
                             "the search time grows about in proportion)")
    search.add_argument("--trs", type=number, default=None, metavar="PX",
                        help="origin search range in pixels (default 8%% of the box, 2 to 8)")
    search.add_argument("--npeaks", type=int, default=3, metavar="N",
                        help="orientations kept per particle, weighted by their correlation (default 3)")
    search.add_argument("--sigma", type=number, default=0.02, metavar="S",
                        help="softness of those weights: orientation j of a particle weighs exp(-(1 - corr_j) / S), "
                             "normalised (default 0.02; smaller trusts the best orientation more)")
    search.add_argument("--no_subgrid", action="store_true",
                        help="keep each particle's best orientation on the search grid; by default it is refined "
                             "between the grid points by a quadratic fit of the correlation around it "
                             "(on the benchmark data, at the default --nspace: median angular error 1.5 instead "
                             "of 2.0 degrees)")
    search.add_argument("--max_iter", type=int, default=30, metavar="N", help="maximum iterations (default 30)")
    search.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    parser.add_argument("--j", type=int, default=None, metavar="THREADS", help="threads (default: all cores)")
    spread = parser.add_argument_group(
        "computing on several processes or machines (optional)",
        "The particles are searched in chunks; with one of these options the chunks run on a\n"
        "Dask cluster instead of inside this program, with the same results (up to rounding in\n"
        "the last digits). Needs the dask extra: pip install \"scipion-em-prime[dask]\".")
    spread.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="send the chunks to a Dask cluster that is already running, for example one "
                             "started on the queue with dask-jobqueue: the address its scheduler prints, "
                             "like tcp://10.0.0.5:8786. The workers need this same version of prime and must "
                             "see the particle images under the same paths as this computer. Start one worker "
                             "with one thread per machine (dask worker ADDRESS --nthreads 1): each chunk then "
                             "uses all the cores of its machine")
    spread.add_argument("--cluster", default=None, metavar="local:N",
                        help="start N worker processes on this computer (1 thread each) and send the chunks to "
                             "them; they are stopped at the end. Mostly to try a cluster set-up on a workstation")


def parameters_from_args(args):
    """The engine's :class:`~prime_plugin.core.refine.RefineParameters` for parsed ``prime refine`` options."""
    from prime_plugin.core.refine import RefineParameters

    return RefineParameters(args.i, args.ref, args.o, symmetry=args.sym, particle_diameter_A=args.particle_diameter,
                            ini_high_A=args.ini_high, update_fraction=args.update_frac, n_space=args.nspace,
                            trs_px=args.trs, n_peaks=args.npeaks, sigma=args.sigma, max_iter=args.max_iter,
                            threads=args.j, solvent_mask=args.solvent_mask, seed=args.seed, pixel_size_A=args.angpix,
                            scheduler=args.scheduler, cluster=args.cluster, subgrid=not args.no_subgrid,
                            search_mode=args.search, noise_model=not args.no_noise_model, ctf=not args.no_ctf,
                            local_sigma_deg=_local_sigma(args))


def _local_sigma(args):
    """--sigma_ang when --local is given (its default without a value), else None; --sigma_ang alone is refused."""
    from prime_plugin.core.errors import PrimeInputError

    if not args.local:
        if args.sigma_ang is not None:
            raise PrimeInputError("--sigma_ang is the width of a local refinement's search: give --local too")
        return None
    return DEFAULT_SIGMA_ANG_DEG if args.sigma_ang is None else args.sigma_ang


def main(args):
    from prime_plugin.core import run_folder
    from prime_plugin.core.errors import PrimeInputError
    from prime_plugin.core.refine import refine
    from prime_plugin.core.run_inputs import InputsDiffer

    out = Path(args.o)
    if args.resume and args.force:
        raise PrimeInputError("--continue and --force exclude each other")
    if args.resume and not run_folder.has_complete_iteration(out):
        instead = "with --force" if run_folder.holds_run(out) else "without --continue"
        raise PrimeInputError(f"holds no complete iteration to continue from; run again {instead}", out)
    if not (args.resume or args.force) and run_folder.holds_run(out):
        raise PrimeInputError("already holds a refinement; use --continue to resume it or --force to overwrite", out)
    params = parameters_from_args(args)
    bar = _ProgressBar(args.max_iter)
    log = []

    def prepared():  # the inputs are good: now the log and the bar may appear
        log.append(_start_log(out, args.resume))
        bar.open()

    try:
        result = refine(params, resume=args.resume, progress=bar.update, prepared=prepared)
    except InputsDiffer as differ:
        raise PrimeInputError(_differs_in_flags(differ, out)) from None
    except KeyboardInterrupt as stop:
        stop.hint = ("; the last complete iteration is kept: continue with --continue"
                     if run_folder.has_complete_iteration(out) and log else "")
        raise
    finally:
        bar.close()
        for handler in log:
            logging.getLogger("prime").removeHandler(handler)
            handler.close()
    print(f"Gold-standard resolution (FSC 0.143): {result.resolution_A:.2f} A after {result.state.iteration} "
          f"iterations. Map: {out / 'run_class001.mrc'}; particles: {out / 'run_data.star'}; "
          f"plots: {out / 'fsc.png'}, {out / 'convergence.png'}.")
    return 0


def _differs_in_flags(differ, out):
    """The engine's refusal to continue with other inputs (run_inputs.InputsDiffer), in this command's options."""
    from prime_plugin.core.errors import PrimeInputError

    name = differ.parameter
    if name in NEGATED_FLAGS:
        now, then = ("given" if value is False else "not given" for value in (differ.given, differ.recorded))
        difference = f"{NEGATED_FLAGS[name]} is {now} here but was {then} when the run in {out} started"
    else:
        difference = PrimeInputError(differ.difference, parameter=name).reworded(PARAMETER_NAMES).problem
    return f"{difference}; continue it with the same options, or start anew with --force"


def _start_log(out, resume):
    """run.log in the output folder (appended when continuing), one line per iteration; returns its handler."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / RUN_MARKER, mode="a" if resume else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("prime")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.info("prime " + " ".join(sys.argv[1:]))
    return handler


class _ProgressBar:
    """tqdm bar over iterations on stderr, with the current resolution."""

    def __init__(self, total):
        self.total = total
        self.bar = None

    def open(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="it", desc="prime refine", file=sys.stderr, dynamic_ncols=True)

    def update(self, state, figures):
        self.bar.n = state.iteration
        self.bar.set_postfix(res=f"{figures['resolution_A']:.1f}A", visited=f"{100 * figures['fraction_visited']:.0f}%")
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
