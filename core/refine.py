"""Gold-standard PRIME refinement with incremental learning (ALGORITHM.md sections 4-8).

    from prime_plugin.core.refine import RefineParameters, refine
    result = refine(RefineParameters("particles.star", "start.mrc", "Refine/run1", symmetry="D2"),
                    on_iteration=lambda figures: print(figures))

Per iteration: choose the update set (least often, then least recently searched
particles, a fraction ``update_fraction`` of all), polarise the references of each
half map up to the current ring limit, search each particle against its own half
(exhaustive for particles never searched, stochastic hill climbing otherwise, then
L-BFGS-B origins and softmax weights over the n_peaks best orientations), blend the
half-sets' Fourier sums U <- (1 - delta) U + U_new, reconstruct, measure the FSC
between the half maps, set the next ring limit, write the iteration and its
checkpoint. At the end every particle is inserted once more at its final
orientations to give the final half maps, FSC and combined map.

Work decomposition: each pass over particles (the update set of an iteration, all
particles at the end) is cut, half-set by half-set, into chunks of ``chunk_size``
particles; each chunk is one task of :mod:`~prime_plugin.core.refine_tasks` (it reads
its own images and returns its particles' new orientations and its partial sums), run
by an execution backend (:mod:`~prime_plugin.core.execution`): in this process by
default, or on a Dask cluster (``scheduler`` or ``cluster``). The backend adds up each
half's partial sums; the state is updated here from the tasks' outputs.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prime_plugin.core.directions import coarse_subset
from prime_plugin.core.execution import make_backend
from prime_plugin.core.fourier import fsc, resolution_at, soft_sphere_mask
from prime_plugin.core.fsc_correction import corrected_fsc
from prime_plugin.core.geometry import euler_to_matrix, rotation_angles_deg
from prime_plugin.core.noise import NoiseModel, first_estimate
from prime_plugin.core.pipelines import thread_limit
from prime_plugin.core.polar import PolarGrid, default_n_rot
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.reconstruct import FourierSums, reconstruct_volume
from prime_plugin.core.refine_setup import prepare
from prime_plugin.core.refine_state import RefineState, select_update_set
from prime_plugin.core.refine_tasks import (MASK_EDGE_PX, InsertChunk, InsertionSettings, SearchChunk, SearchSettings,
                                            insert_chunk, search_chunk)
from prime_plugin.core.run_folder import begin_run
from prime_plugin.core.search import PolarReferences
from prime_plugin.core.star_reconstruction import combined_fsc
from prime_plugin.core.working_box import fourier_resize, insertion_radius_px, working_box, working_box_size

log = logging.getLogger("prime.refine")
CHECKPOINTS = ".checkpoint"
LATER_FSC_LIMIT = 0.3  # once every particle has been searched, the alignment limit follows this FSC value
DIP_SHELLS = 3  # the alignment limit is where the FSC stays below its threshold for this many shells
LOCAL_WINDOW_SIGMAS = 3.0  # a local search's window, in --sigma_ang


@dataclass
class RefineParameters:
    """What ``prime refine`` takes; units in the names. Defaults suit typical data.

    update_fraction : fraction of the particles searched per iteration (PRIME's delta;
    1 is classic batch refinement). n_space : projection directions in the asymmetric
    unit (4000: with the sub-grid refinement the median angular error on
    benchmarks/bench_refine.py's data is 1.54 degrees, against 1.58 at 2000 and 1.53 at
    8000). trs_px : origin search radius (default 8% of the box, 2-8 px); shift_step_px : the
    grid step of the first (exhaustive) origin search (default trs_px / 2).
    fsc_limit : the FSC value whose crossing sets the next iteration's ring limit.
    n_peaks, sigma : orientations kept per particle and the softness of their weights
    exp(-(1 - corr) / sigma). sigma = 0.02 (ALGORITHM.md's 0.005 is the seed talk's value,
    SIMPLE's code uses 0.01): on benchmarks/bench_refine.py's data (SNR 0.05) 0.005, 0.01,
    0.02 and 0.04 gave 17.00, 16.69, 16.57 and 16.52 A with the same median angular error.
    threads : threads of this process (default: all cores). chunk_size : particles per task.
    Where the tasks run (default: in this process, with ``threads``), at most one of:
    scheduler : the address of a running Dask scheduler (e.g. ``"tcp://10.0.0.5:8786"``);
    its workers must have this package and see the images under the same paths.
    cluster : ``"local:N"``, N Dask worker processes started on this computer, 1 thread each.
    Both need the optional ``dask`` extra. The backends agree to float32 rounding of the sums,
    which only rarely tips a particle's search another way (:mod:`~prime_plugin.core.execution`).
    ctf : correct for the CTF (the particles must carry defocus); False refines without CTF correction.
    local_sigma_deg : a local refinement (RELION's --sigma_ang, degrees): every search scores only the
    orientations within LOCAL_WINDOW_SIGMAS times this angle of the particle's input orientation
    (rlnAngleRot/Tilt/Psi, required) and origins within trs_px of its input origin; None: global searches.
    """

    particles: str
    reference: str
    output_dir: str
    symmetry: str = "C1"
    particle_diameter_A: float = None
    ini_high_A: float = 40.0
    update_fraction: float = 0.2
    n_space: int = 4000
    trs_px: float = None
    shift_step_px: float = None
    n_peaks: int = 3
    sigma: float = 0.02
    max_iter: int = 30
    fsc_limit: float = 0.5
    threads: int = None
    solvent_mask: str = None
    seed: int = 0
    chunk_size: int = 256
    pixel_size_A: float = None
    scheduler: str = None
    cluster: str = None
    subgrid: bool = True
    noise_model: bool = True
    search_mode: str = "greedy"
    scale_weighting: bool = True
    ctf: bool = True
    local_sigma_deg: float = None


@dataclass
class RefineResult:
    """Final maps (float32 (N, N, N)), FSC between the final half maps, resolution (A), state."""

    half_maps: list
    volume: np.ndarray
    fsc: np.ndarray
    resolution_A: float
    state: RefineState
    setup: object


def refine(params, on_iteration=None, resume=False, progress=None, prepared=None):
    """Run (or continue) a refinement; returns a :class:`RefineResult`. Outputs go to ``params.output_dir``.

    on_iteration(figures) : called after each iteration with its figures (a dict).
    progress(state, figures) : the same, with the state (for progress bars).
    prepared() : called once the inputs are checked, the backend is ready and the folder prepared
    (:func:`~prime_plugin.core.run_folder.begin_run`), before any result is written.
    The Dask backend, when asked for, is closed at the end, also on an error or an interruption.
    """
    from prime_plugin.core import refine_outputs as outputs

    setup = prepare(params)
    out = Path(params.output_dir)
    with make_backend(params.scheduler, params.cluster) as backend, thread_limit(params.threads), setup.images:
        begin_run(params, resume)  # checks a continuation's inputs, or clears an earlier run's files
        if prepared is not None:
            prepared()
        for note in setup.notes:
            log.info(note)
        log.info(f"Particle search and insertion run in {backend.description}.")
        if resume:
            state = RefineState.load(out / CHECKPOINTS)
            log.info(f"Continuing after iteration {state.iteration}.")
        else:
            local = params.local_sigma_deg is not None
            state = RefineState.start(setup.half, setup.input_angles_deg if local else
                                      np.full((len(setup.half), 3), np.nan), setup.start_shifts_px,
                                      params.n_peaks, setup.initial_ring_limit,
                                      working_box_size(setup.box, setup.initial_ring_limit))
            if params.noise_model:
                state.noise = NoiseModel.empty(*setup.noise_groups, setup.box)
                first_estimate(state.noise, setup.images, setup.mask_radius_px, MASK_EDGE_PX,
                               np.random.default_rng([params.seed, 4]))
                log.info(f"Noise model: {state.noise.n_groups} group(s) "
                         f"({'micrographs' if setup.noise_by_micrograph else 'optics groups'}).")
        work = _working_box(setup, state.sums[0].box)
        curve = None if state.iteration == 0 else gold_standard_fsc(_current_maps(state, setup, work), work, params,
                                                                     state.iteration)
        while state.iteration < params.max_iter:
            started = time.perf_counter()
            work = _grow_working_box(state, setup)
            figures = _iterate(state, setup, params, curve, backend, work)
            maps = _current_maps(state, setup, work)
            curve = gold_standard_fsc(maps, work, params, state.iteration)
            figures.update(_resolution_figures(state, setup, params, curve))
            figures["resolution_unmasked_A"] = float(resolution_at(work.full_length(fsc(*maps)), 0.143,
                                                                   setup.box, setup.pixel_size_A))
            figures["working_box"] = work.box
            figures["seconds"] = round(time.perf_counter() - started, 2)
            state.history.append(figures)
            log.info(_log_line(figures))
            outputs.write_iteration(out, state, setup, [work.written(m) for m in maps], curve)
            state.save(out / CHECKPOINTS)
            if progress is not None:
                progress(state, figures)
            if on_iteration is not None:
                on_iteration(dict(figures))
            if _converged(state, params, setup):
                log.info(f"Converged at iteration {state.iteration}.")
                break
        if params.scale_weighting:
            log.info(_weight_summary(state.scale))
        result = _final_maps(state, setup, params, backend, curve)
        outputs.write_final(out, result, params)
        log.info(_peak_memory_line())
    return result


def _peak_memory_line():
    """The log's last line: this process's peak resident memory (where the system reports it)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return "Peak memory: not reported on this system."
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return f"Peak memory (resident set of this process): {peak_kb / 2**20:.2f} GB."


def _log_line(f):
    return (f"iteration {f['iteration']:3d}: resolution {f['resolution_A']:.2f} A (FSC 0.143 under the mask; "
            f"{f['resolution_unmasked_A']:.2f} A unmasked), "
            f"alignment to {f['ring_limit']} Fourier px at box {f['working_box']}, searched {f['updated']} particles, "
            f"visited {100 * f['fraction_visited']:.0f}% of the directions, median orientation change "
            f"{_degrees(f['orientation_change_deg'])}, mean correlation {f['mean_correlation']:.3f}, {f['seconds']:.1f} s")


LOW_WEIGHT = 0.25  # the log counts particles inserted with less than this fraction of the median weight


def _weight_summary(scale):
    """A log line on the particles' insertion weights (their contrast scales squared)."""
    weight = np.asarray(scale, np.float64) ** 2
    low = int((weight < LOW_WEIGHT * np.median(weight)).sum())
    return (f"Particle weights (contrast against the reference, squared): {low} of {len(weight)} particles weigh "
            f"less than {LOW_WEIGHT:g} of the median particle (little contrast: junk, damage or a wrong "
            f"orientation); none is dropped. Each particle's contrast is rlnPrimeContrast in run_data.star.")


def _degrees(value):
    return "n/a (first search)" if np.isnan(value) else f"{value:.2f} deg"


def _working_box(setup, size):
    return working_box(size, setup.box, setup.pixel_size_A, setup.mask)


def _grow_working_box(state, setup):
    """The working box of the next iteration (:mod:`~prime_plugin.core.working_box`): the one holding its
    alignment limit and the last FSC's 0.143 crossing (RELION's current_size: the maps hold the resolution
    reached, plus the margin, so that the final maps need no other box), never smaller than the sums'.
    The sums grow to it (zeros beyond what they held)."""
    shell = max([state.ring_limit] + [figures.get("resolution_shell", 0) for figures in state.history[-1:]])
    size = working_box_size(setup.box, shell, current=state.sums[0].box)
    state.sums = [sums.grown(size) for sums in state.sums]
    return _working_box(setup, size)


def _current_maps(state, setup, work):
    """Half maps at the working box ``work`` from the current sums (the low-passed reference before the
    first iteration)."""
    if state.iteration == 0:
        reference = fourier_resize(setup.reference, work.box)
        return [reference, reference]
    return _maps_from_sums(state.sums, work)


def gold_standard_fsc(maps, work, params, iteration):
    """The FSC between the two half maps (at the WorkingBox ``work``) under its mask, as a curve of the
    full box's shells: with a solvent mask (params.solvent_mask), corrected for the mask by phase
    randomisation (:func:`~prime_plugin.core.fsc_correction.corrected_fsc`, as relion_postprocess; seeded
    by the iteration), else under the soft sphere as it is. Before the unmasked FSC falls below 0.8 there
    is nothing to correct: the masked FSC."""
    masked = fsc(maps[0] * work.mask, maps[1] * work.mask)
    if not params.solvent_mask:
        return work.full_length(masked)
    try:
        curve = corrected_fsc(maps[0], maps[1], work.mask, work.pixel_size_A,
                              rng=np.random.default_rng([params.seed, 5, iteration])).corrected
    except ValueError:  # the unmasked FSC never falls below 0.8
        curve = masked
    return work.full_length(curve)


def _maps_from_sums(sums, work, curve=None):
    """Half maps at ``work``'s box (Wiener-filtered with the FSC between them, or with ``curve`` when
    given) from two sums."""
    corners = soft_sphere_mask(work.box, work.box / 2.0, 3.0)
    if curve is None:
        first = [reconstruct_volume(s) * corners for s in sums]
        curve = fsc(first[0] * work.mask, first[1] * work.mask)
    return [reconstruct_volume(s, curve) * corners for s in sums]


def _previous_contributions(state, setup, params, rows, backend, work):
    """Per half-set, the sums (at ``work``'s box) of particles ``rows`` inserted at their current
    orientations, each at the working box it was inserted at (those never searched add nothing):
    exactly what the current sums hold of them."""
    total = [FourierSums.zeros(work.box), FourierSums.zeros(work.box)]
    inserted = rows[state.inserted_box[rows] > 0]
    for box in np.unique(state.inserted_box[inserted]):
        part_rows = inserted[state.inserted_box[inserted] == box]
        chunks = _insert_chunks(state, setup, params, part_rows)
        _, sums = backend.map_reduce(insert_chunk, chunks, _insertion_settings(setup, backend, int(box)),
                                     [c.half for c in chunks], name=f"prime-previous-it{state.iteration:03d}-{box}")
        for h in sums:
            total[h - 1] += sums[h].grown(work.box)
    return total


def _insert_chunks(state, setup, params, rows):
    """Insertion tasks of particles ``rows`` at their current orientations, origins, weights and contrasts."""
    return [InsertChunk(index, half, part, setup.images.locate(part), state.shift_px[part], _ctf_of(setup, part),
                        state.peak_angles_deg[part], state.peak_weights[part],
                        state.scale[part] if params.scale_weighting else None)
            for index, (half, part) in enumerate(_half_set_chunks(rows, setup.half, params.chunk_size))]


def _iterate(state, setup, params, curve, backend, work):
    """One iteration: search the update set and replace its particles' insertions in the sums; returns
    the iteration's figures. ``curve``: the FSC between the current half maps (None before the first
    iteration), for the Wiener filter of the search references.

    The first iteration searches every particle against the starting map. Later ones search the
    update set (a fraction ``update_fraction``, least often then least recently searched first) in
    passes of at most MAX_PASS_FRACTION of the particles: each pass is searched against its half's
    map without the pass's own previous insertions (a particle's own insertion favours its
    previous orientation, which on small real data sets keeps wrong orientations wrong), then its
    new insertions replace the previous ones.
    """
    state.iteration += 1
    rng = np.random.default_rng([params.seed, 2, state.iteration])
    rows = select_update_set(state, 1.0 if state.iteration == 1 else params.update_fraction, rng)
    # In-plane sampling follows the working box (SIMPLE's rule on the particle's radius in its px).
    grid = PolarGrid(work.box, 2, state.ring_limit, default_n_rot(setup.mask_radius_px * work.scale))
    previous_angles = state.angles_deg[rows].copy()
    found = []
    for part in _passes(rows, len(state.half)):
        found += _search_pass(state, setup, params, grid, part, curve, backend, work, first_chunk=len(found))
    if state.noise is not None:
        state.noise.add(np.concatenate([f.rows for f in found]), np.concatenate([f.ring_residual for f in found]),
                        grid.rings.astype(np.int64), keep=1.0 - len(rows) / len(state.half))
    state.update_count[rows] += 1
    state.last_update[rows] = state.iteration
    changes = _orientation_changes(previous_angles, state.angles_deg[rows])
    return {"iteration": state.iteration, "updated": len(rows), "ring_limit": int(state.ring_limit),
            "fraction_visited": float(state.fraction_visited[rows].mean()),
            "orientation_change_deg": float(np.median(changes)) if changes.size else float("nan"),
            "mean_correlation": float(state.correlation[rows].mean())}


MAX_PASS_FRACTION = 0.25  # particles searched against sums without their own insertions, at most, per pass


def _passes(rows, n_particles):
    """``rows`` cut into passes of at most MAX_PASS_FRACTION of the particles (in order)."""
    count = int(np.ceil(len(rows) / max(1, int(MAX_PASS_FRACTION * n_particles))))
    return np.array_split(rows, count) if count > 1 else [rows]


def _search_pass(state, setup, params, grid, rows, curve, backend, work, first_chunk):
    """Search particles ``rows`` at the working box ``work`` and replace their insertions in the sums;
    returns the tasks' outputs. The pass's chunks are numbered from ``first_chunk`` (the number seeds
    each chunk's generator)."""
    if curve is None:  # nothing inserted yet: the starting map
        kept = state.sums
        maps = [fourier_resize(setup.reference, work.box)] * 2
    else:
        previous = _previous_contributions(state, setup, params, rows, backend, work)
        kept = [total - mine for total, mine in zip(state.sums, previous)]
        del previous
        maps = _maps_from_sums(kept, work, curve)
    references = [PolarReferences.from_projector(FourierProjector(m * work.mask), setup.directions_deg, grid)
                  for m in maps]
    del maps
    settings = SearchSettings(references, grid, setup.directions_deg, setup.neighbours,
                              coarse_directions(setup, grid.k_to), setup.trs_px,
                              offset_step_px(setup, params, grid.k_to),
                              params.n_peaks, params.sigma, params.seed, state.iteration,
                              _insertion_settings(setup, backend, work.box),
                              (setup.symmetry_ops, setup.angular_step_deg) if params.subgrid else None,
                              measure_noise=state.noise is not None, search_mode=params.search_mode,
                              scale_weighting=params.scale_weighting, local_window_deg=_local_window_deg(params),
                              research_window_deg=research_window_deg(setup, grid.k_to))
    rings = grid.rings.astype(np.int64)
    local = params.local_sigma_deg is not None
    # a local search stays near the input orientations and origins; the others start from the current ones
    origins = setup.start_shifts_px if local else state.shift_px
    centres = setup.input_angles_deg if local else (None if settings.research_window_deg is None else state.angles_deg)
    chunks = [SearchChunk(index, half, part, setup.images.locate(part), origins[part], _ctf_of(setup, part),
                          state.direction[part], _psi_indices(state.angles_deg[part], grid),
                          None if state.noise is None else state.noise.ring_weights(part, rings),
                          None if centres is None else centres[part])
              for index, (half, part) in enumerate(_half_set_chunks(rows, setup.half, params.chunk_size),
                                                   start=first_chunk)]
    found, new_sums = backend.map_reduce(search_chunk, chunks, settings, [c.half for c in chunks],
                                         name=f"prime-search-it{state.iteration:03d}-{first_chunk}")
    del chunks, settings, references
    for orientations in found:
        _record(state, orientations)
    for h in (1, 2):  # a half with no particle in this pass adds nothing
        state.sums[h - 1] = kept[h - 1] + (new_sums.pop(h) if h in new_sums else FourierSums.zeros(work.box))
    state.inserted_box[rows] = work.box
    return found


def _psi_indices(angles_deg, grid):
    """The in-plane index (on ``grid``'s n_rot angles) nearest each particle's psi; 0 where unknown. The
    previous search may have used another in-plane sampling (a smaller working box)."""
    psi = np.nan_to_num(angles_deg[:, 2])
    return np.rint(psi / grid.psi_step_deg).astype(np.int64) % grid.n_rot


def _local_window_deg(params):
    return None if params.local_sigma_deg is None else LOCAL_WINDOW_SIGMAS * params.local_sigma_deg


OFFSET_PHASE_TOLERANCE = 2.4  # rad: the origin grid's half-diagonal shifts the alignment limit's ring this much


def offset_step_px(setup, params, ring_limit):
    """The step (px) of the origin grid an exhaustive search scores at alignment limit ``ring_limit``
    (Fourier px): fine enough that an origin half a grid diagonal off still correlates the outer ring
    (phase error 2 pi k d / N at most OFFSET_PHASE_TOLERANCE), at most half the search radius and at
    least 1 px; ``params.shift_step_px`` when given. On real particles a grid of half the radius left
    one in seven particles misaligned (benchmarks/RESULTS.md)."""
    if params.shift_step_px is not None:
        return params.shift_step_px
    step = np.sqrt(2.0) * OFFSET_PHASE_TOLERANCE * setup.box / (2.0 * np.pi * ring_limit)
    return float(np.clip(step, 1.0, max(1.0, setup.trs_px / 2.0)))


LOCAL_RESEARCH_BELOW_DEG = 2.5  # re-searches turn local once the resolution needs a finer sampling than this
LOCAL_RESEARCH_SAMPLINGS = 3.0  # ... within this many required samplings of the current orientation


def required_sampling_deg(setup, ring_limit):
    """The angular sampling (deg) alignment to ``ring_limit`` (Fourier px) needs: the angle over which the
    particle's edge moves by one resolution element, 360 r / (pi D) (RELION's rule)."""
    return 360.0 * setup.box / (np.pi * ring_limit * 2.0 * setup.mask_radius_px)


def research_window_deg(setup, ring_limit):
    """The orientation window (deg) of a re-search at alignment limit ``ring_limit``, or None (exhaustive):
    once the required sampling is finer than LOCAL_RESEARCH_BELOW_DEG, a particle searched before is
    searched within LOCAL_RESEARCH_SAMPLINGS samplings of its current orientation (at least two grid
    steps). Scoring the whole coarse grid at every origin there cost most of an iteration at box 256
    (benchmarks/RESULTS.md, "Realistic sizes"); its orientation is by then known to about a sampling.
    Data at box 64 and 3.5-5 A/px never get there (their finest required sampling is about 4 degrees)."""
    needed = required_sampling_deg(setup, ring_limit)
    if needed >= LOCAL_RESEARCH_BELOW_DEG:
        return None
    return max(LOCAL_RESEARCH_SAMPLINGS * needed, 2.0 * setup.angular_step_deg)


COARSE_OVERSAMPLING = 1.5  # the coarse grid's step is the resolution's required sampling / this
MAX_COARSE_FRACTION = 0.25  # the coarse grid never holds more than this fraction of the directions


def coarse_directions(setup, ring_limit):
    """Indices of the directions an exhaustive search scores first at alignment limit ``ring_limit``
    (Fourier px): a grid whose step is the angular sampling this resolution needs (RELION's rule: the
    angle over which the particle's edge moves by one resolution element, 360 r / (pi D) degrees),
    divided by COARSE_OVERSAMPLING; at most MAX_COARSE_FRACTION of the directions."""
    needed_deg = required_sampling_deg(setup, ring_limit) / COARSE_OVERSAMPLING
    fraction = min(MAX_COARSE_FRACTION, (setup.angular_step_deg / needed_deg) ** 2)
    return coarse_subset(setup.directions_deg, setup.symmetry_ops, fraction)


def _half_set_chunks(rows, half, chunk_size):
    """The work decomposition: (half-set, rows) pieces, half 1 then half 2, each half's ``rows`` in
    order, cut into pieces of at most ``chunk_size``. The order numbers the chunks (and seeds them)."""
    for h in (1, 2):
        mine = rows[half[rows] == h]
        for start in range(0, len(mine), chunk_size):
            yield h, mine[start:start + chunk_size]


def _ctf_of(setup, rows):
    return None if setup.ctf is None else setup.ctf.take(rows)


def _insertion_settings(setup, backend, box=None):
    """Insertion at working box ``box`` (default: the full box, the final maps)."""
    box = setup.box if box is None else int(box)
    return InsertionSettings(box, setup.pixel_size_A * setup.box / box, setup.mask_radius_px, setup.symmetry_ops,
                             backend.threads_per_task, image_box=setup.box,
                             insertion_radius_px=insertion_radius_px(box, setup.box))


def _record(state, found):
    """Store a search task's ChunkOrientations into the state (every per-particle field has the same name in both)."""
    rows = found.rows
    for name in found.per_particle_fields():
        getattr(state, name)[rows] = getattr(found, name)
    state.angles_deg[rows] = found.peak_angles_deg[:, 0]


def _orientation_changes(before, after):
    """Angles (deg) between the rotations before and after, for particles that had one before."""
    known = np.isfinite(before).all(axis=1)
    if not known.any():
        return np.array([])
    return rotation_angles_deg(euler_to_matrix(*before[known].T), euler_to_matrix(*after[known].T))


def _resolution_figures(state, setup, params, curve):
    """Gold-standard resolution and the ring limit of the next iteration (in place)."""
    apix, box = setup.pixel_size_A, setup.box
    threshold = params.fsc_limit if state.update_count.min() < 1 else min(params.fsc_limit, LATER_FSC_LIMIT)
    crossing = sustained_crossing(curve, threshold)
    state.ring_limit = int(np.clip(max(crossing, setup.initial_ring_limit), 3, box // 2 - 2))
    return {"resolution_A": float(resolution_at(curve, 0.143, box, apix)),
            "resolution_shell": int(sustained_crossing(curve, 0.143)),
            "resolution_05_A": float(resolution_at(curve, 0.5, box, apix)),
            "next_ring_limit": state.ring_limit, "next_limit_A": float(box * apix / state.ring_limit)}


def sustained_crossing(curve, threshold, shells=DIP_SHELLS):
    """The first shell (>= 1) from which the FSC stays below ``threshold`` for ``shells`` shells in a row
    (N // 2 when it never does). A dip narrower than that (the shells where every particle's CTF is near
    zero, when the defoci are alike) does not end the alignment there."""
    below = np.asarray(curve[1:]) < threshold
    for k in range(len(below)):
        if below[k:k + shells].all():
            return k + 1
    return len(curve) - 1


def _converged(state, params, setup):
    """Every particle searched at least twice, and over the last 1/delta iterations (at least 2): the
    median orientation change below the angular step, the alignment limit unchanged (and not about to
    change), the resolution no longer improving; with stochastic hill climbing also > 90% of the
    directions visited (the climbs found nothing better)."""
    window = max(2, int(np.ceil(1.0 / params.update_fraction)))
    history = state.history
    if state.update_count.min() < 2 or len(history) < 2 * window:
        return False
    recent = history[-window:]
    visited = params.search_mode != "shc" or all(h["fraction_visited"] > 0.9 for h in recent)
    steady = all(h["orientation_change_deg"] < setup.angular_step_deg for h in recent)
    limit_fixed = len({h["ring_limit"] for h in recent} | {recent[-1]["next_ring_limit"]}) == 1
    best_before = min(h["resolution_A"] for h in history[:-window])
    improving = min(h["resolution_A"] for h in recent) < 0.99 * best_before
    return visited and steady and limit_fixed and not improving


def _final_maps(state, setup, params, backend, curve):
    """The final half maps, FSC and combined map, from sums holding every particle once at its final
    orientations: the refinement's sums, which already do, at the final box (the one holding the last
    FSC's sustained 0.143 crossing plus the working margin, :mod:`~prime_plugin.core.working_box`; the
    full box when that reaches it). The particles last inserted at a smaller box are inserted anew at
    it (chunks run by ``backend``). Maps of the full box; nothing beyond the final box: the FSC was
    below 0.143 for WORK_MARGIN_PX shells before it."""
    size = working_box_size(setup.box, sustained_crossing(curve, 0.143), current=state.sums[0].box)
    state.sums = [sums.grown(size) for sums in state.sums]
    work = _working_box(setup, size)
    behind = np.flatnonzero(state.inserted_box < size)
    if behind.size:
        previous = _previous_contributions(state, setup, params, behind, backend, work)
        chunks = _insert_chunks(state, setup, params, behind)
        _, fresh = backend.map_reduce(insert_chunk, chunks, _insertion_settings(setup, backend, size),
                                      [c.half for c in chunks], name="prime-final")
        for h in (1, 2):
            state.sums[h - 1] = state.sums[h - 1] - previous[h - 1] + (fresh.get(h) or FourierSums.zeros(size))
        state.inserted_box[behind] = size
        log.info(f"Final maps at box {size}: {behind.size} particles inserted anew at it.")
    final = state.sums
    corners = soft_sphere_mask(size, size / 2.0, 3.0)
    first = [reconstruct_volume(s) * corners for s in final]
    own_curve = fsc(first[0] * work.mask, first[1] * work.mask)
    del first
    half_maps = [reconstruct_volume(s, own_curve) * corners for s in final]
    both = FourierSums(final[0].U + final[1].U, final[0].rho + final[1].rho, size)
    volume = work.written(reconstruct_volume(both, combined_fsc(own_curve)) * corners)
    del both
    # Reported as in every iteration: the FSC of the written (Wiener-filtered) half maps, masked; those of
    # the full box, as a user would measure it from the files.
    half_maps = [work.written(m) for m in half_maps]
    reported = gold_standard_fsc(half_maps, _working_box(setup, setup.box), params, state.iteration + 1)
    return RefineResult(half_maps, volume, reported,
                        float(resolution_at(reported, 0.143, setup.box, setup.pixel_size_A)), state, setup)
