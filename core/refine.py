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
"""

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prime_plugin.core.ctf import ctf_image
from prime_plugin.core.fourier import fsc, resolution_at, soft_sphere_mask
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.polar import PolarGrid, normalise_and_mask, particle_sections
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.reconstruct import Backprojector, FourierSums, reconstruct_volume
from prime_plugin.core.refine_setup import prepare
from prime_plugin.core.refine_state import RefineState, select_update_set
from prime_plugin.core.search import PolarReferences, search_particles
from prime_plugin.core.star_reconstruction import _thread_limit, combined_fsc

log = logging.getLogger("prime.refine")
CHECKPOINTS = ".checkpoint"


@dataclass
class RefineParameters:
    """What ``prime refine`` takes; units in the names. Defaults suit typical data.

    update_fraction : fraction of the particles searched per iteration (PRIME's delta;
    1 is classic batch refinement). n_space : projection directions in the asymmetric
    unit. trs_px : origin search radius (default 8% of the box, 2-8 px); shift_step_px : the
    grid step of the first (exhaustive) origin search (default trs_px / 2).
    fsc_limit : the FSC value whose crossing sets the next iteration's ring limit.
    """

    particles: str
    reference: str
    output_dir: str
    symmetry: str = "C1"
    particle_diameter_A: float = None
    ini_high_A: float = 40.0
    update_fraction: float = 0.1
    n_space: int = 2000
    trs_px: float = None
    shift_step_px: float = None
    n_peaks: int = 3
    sigma: float = 0.005
    max_iter: int = 30
    fsc_limit: float = 0.5
    threads: int = None
    solvent_mask: str = None
    seed: int = 0
    chunk_size: int = 256
    pixel_size_A: float = None


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
    prepared() : called once the inputs are checked, before anything is written.
    """
    from prime_plugin.core import refine_outputs as outputs

    setup = prepare(params)
    out = Path(params.output_dir)
    if prepared is not None:
        prepared()
    for note in setup.notes:
        log.info(note)
    if not resume:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    with _thread_limit(params.threads), setup.images:
        if resume:
            state = RefineState.load(out / CHECKPOINTS)
            log.info(f"Continuing after iteration {state.iteration}.")
        else:
            state = RefineState.start(setup.half, np.full((len(setup.half), 3), np.nan), setup.start_shifts_px,
                                      params.n_peaks, setup.initial_ring_limit, setup.box)
        maps = _current_maps(state, setup)
        while state.iteration < params.max_iter:
            started = time.perf_counter()
            figures = _iterate(state, setup, params, maps)
            maps = _current_maps(state, setup)
            curve = fsc(maps[0] * setup.mask, maps[1] * setup.mask)
            figures.update(_resolution_figures(state, setup, params, curve))
            figures["resolution_unmasked_A"] = float(resolution_at(fsc(*maps), 0.143, setup.box, setup.pixel_size_A))
            figures["seconds"] = round(time.perf_counter() - started, 2)
            state.history.append(figures)
            log.info(_log_line(figures))
            outputs.write_iteration(out, state, setup, maps, curve)
            state.save(out / CHECKPOINTS)
            if progress is not None:
                progress(state, figures)
            if on_iteration is not None:
                on_iteration(dict(figures))
            if _converged(state, params, setup):
                log.info(f"Converged at iteration {state.iteration}.")
                break
        result = _final_maps(state, setup, params)
        outputs.write_final(out, result, params)
    return result


def _log_line(f):
    return (f"iteration {f['iteration']:3d}: resolution {f['resolution_A']:.2f} A (FSC 0.143 masked; "
            f"{f['resolution_unmasked_A']:.2f} A unmasked), "
            f"alignment to {f['ring_limit']} Fourier px, searched {f['updated']} particles, "
            f"visited {100 * f['fraction_visited']:.0f}% of the directions, median orientation change "
            f"{_degrees(f['orientation_change_deg'])}, mean correlation {f['mean_correlation']:.3f}, {f['seconds']:.1f} s")


def _degrees(value):
    return "n/a (first search)" if np.isnan(value) else f"{value:.2f} deg"


def _current_maps(state, setup):
    """Half maps from the current sums (the low-passed reference before the first iteration)."""
    if state.iteration == 0:
        return [setup.reference, setup.reference]
    corners = soft_sphere_mask(setup.box, setup.box / 2.0, 3.0)
    first = [reconstruct_volume(s) * corners for s in state.sums]
    curve = fsc(first[0] * setup.mask, first[1] * setup.mask)
    return [reconstruct_volume(s, curve) * corners for s in state.sums]


def _iterate(state, setup, params, maps):
    """One iteration of search and sum updates; returns its figures."""
    state.iteration += 1
    rng = np.random.default_rng([params.seed, 2, state.iteration])
    rows = select_update_set(state, params.update_fraction, rng)
    grid = PolarGrid(setup.box, 2, state.ring_limit, setup.n_rot)
    references = [PolarReferences.from_projector(FourierProjector(m * setup.mask), setup.directions_deg, grid)
                  for m in maps]
    backprojector = Backprojector(setup.box, symmetry_ops=setup.symmetry_ops if len(setup.symmetry_ops) > 1 else None)
    new_sums = [_accumulators(setup.box) for _ in (1, 2)]
    previous_angles = state.angles_deg[rows].copy()
    for chunk_rows, images in setup.images.chunks(params.chunk_size, rows):
        normalised = normalise_and_mask(images, setup.mask_radius_px, edge_px=4.0, mask=False)
        for h in (1, 2):
            sub = np.flatnonzero(setup.half[chunk_rows] == h)
            if sub.size:
                _search_and_insert(state, setup, params, grid, references[h - 1], backprojector,
                                   new_sums[h - 1], chunk_rows[sub], normalised[sub], rng)
    delta = params.update_fraction
    for h in (0, 1):
        U, rho = new_sums[h]
        state.sums[h] = state.sums[h].scaled(1.0 - delta) + FourierSums(U.sum(0), rho.sum(0), setup.box)
    state.update_count[rows] += 1
    state.last_update[rows] = state.iteration
    changes = _orientation_changes(previous_angles, state.angles_deg[rows])
    return {"iteration": state.iteration, "updated": int(len(rows)), "ring_limit": int(state.ring_limit),
            "fraction_visited": float(state.fraction_visited[rows].mean()),
            "orientation_change_deg": float(np.median(changes)) if changes.size else float("nan"),
            "mean_correlation": float(state.correlation[rows].mean())}


def _accumulators(box, padding=2.0):
    """One grid of sums (U, rho) with a leading axis of 1: the insertion threads share it (slab-parallel)."""
    padded = int(round(padding * box))
    shape = (1, padded, padded, padded // 2 + 1)
    return np.zeros(shape, np.complex64), np.zeros(shape, np.float32)


def _search_and_insert(state, setup, params, grid, references, backprojector, sums, rows, images, rng):
    """Search particles ``rows`` (one half) and insert them at their new orientations."""
    ctf = None if setup.ctf is None else setup.ctf.take(rows)
    masked = normalise_and_mask(images, setup.mask_radius_px, edge_px=4.0)
    particles = particle_sections(masked, grid, ctf=ctf, pixel_size_A=setup.pixel_size_A)
    searched = state.direction[rows] >= 0
    for is_new in (True, False):
        pick = np.flatnonzero(~searched if is_new else searched)
        if pick.size == 0:
            continue
        target = rows[pick]
        subset = particles.take(pick)
        previous = None if is_new else (state.direction[target], state.psi_index[target])
        result = search_particles(references, subset, grid, state.shift_px[target], rng, previous=previous,
                                  n_peaks=params.n_peaks, sigma=params.sigma, trs_px=setup.trs_px,
                                  shift_step_px=setup.shift_step_px, neighbours=setup.neighbours,
                                  coarse=setup.coarse_directions)
        _record(state, setup, grid, target, result)
    del particles
    full_ctf = None if ctf is None else ctf_image(ctf, setup.box, setup.pixel_size_A, rfft=True)
    data, weights2 = backprojector.image_transforms(images, state.shift_px[rows], full_ctf)
    image_of, rotations, weights = _peak_orientations(state, rows)
    backprojector.insert_per_thread(sums[0], sums[1], data, weights2, rotations, image_of, weights)


def _peak_orientations(state, rows):
    """The weighted orientations of particles ``rows``: image index (k,), rotations (k, 3, 3), weights (k,).

    Peaks of negligible weight (< 1e-4) are left out of the reconstruction.
    """
    n_peaks = state.peak_weights.shape[1]
    keep = state.peak_weights[rows] > 1e-4
    image_of = np.repeat(np.arange(len(rows)), n_peaks).reshape(len(rows), n_peaks)[keep]
    angles = state.peak_angles_deg[rows][keep]
    return image_of, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]), state.peak_weights[rows][keep]


def _record(state, setup, grid, rows, result):
    """Store a SearchResult for particles ``rows``."""
    directions = setup.directions_deg
    state.direction[rows] = result.direction
    state.psi_index[rows] = result.psi_index
    state.shift_px[rows] = result.shift_px
    state.correlation[rows] = result.correlation
    state.fraction_visited[rows] = result.fraction_visited
    psi = result.peak_psi * grid.psi_step_deg
    peak_dirs = np.maximum(result.peak_directions, 0)
    state.peak_directions[rows] = result.peak_directions
    state.peak_psi[rows] = result.peak_psi
    state.peak_angles_deg[rows] = np.stack([directions[peak_dirs, 0], directions[peak_dirs, 1], psi], axis=-1)
    state.peak_weights[rows] = np.where(result.peak_directions >= 0, result.peak_weights, 0.0)
    state.peak_correlations[rows] = result.peak_correlations
    state.angles_deg[rows] = state.peak_angles_deg[rows, 0]


def _orientation_changes(before, after):
    """Angles (deg) between the rotations before and after, for particles that had one before."""
    known = np.isfinite(before).all(axis=1)
    if not known.any():
        return np.array([])
    a = euler_to_matrix(*before[known].T)
    b = euler_to_matrix(*after[known].T)
    cosine = (np.trace(np.einsum("nij,nkj->nik", a, b), axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def _resolution_figures(state, setup, params, curve):
    """Gold-standard resolution and the ring limit of the next iteration (in place)."""
    apix, box = setup.pixel_size_A, setup.box
    threshold = params.fsc_limit if state.update_count.min() < 1 else min(params.fsc_limit, 0.3)
    below = np.flatnonzero(curve[1:] < threshold)
    crossing = (below[0] + 1) if below.size else box // 2
    state.ring_limit = int(np.clip(max(crossing, setup.initial_ring_limit), 3, box // 2 - 2))
    return {"resolution_A": float(resolution_at(curve, 0.143, box, apix)),
            "resolution_05_A": float(resolution_at(curve, 0.5, box, apix)),
            "next_ring_limit": state.ring_limit, "next_limit_A": float(box * apix / state.ring_limit)}


def _converged(state, params, setup):
    """All particles searched, and over the last 1/delta iterations (at least 2): > 90% of the space visited,
    median orientation change below the angular step, the alignment limit unchanged (and not
    about to change), resolution no longer improving."""
    window = max(2, int(np.ceil(1.0 / params.update_fraction)))
    history = state.history
    if state.update_count.min() < 1 or len(history) < 2 * window:
        return False
    recent = history[-window:]
    visited = all(h["fraction_visited"] > 0.9 for h in recent)
    steady = all(h["orientation_change_deg"] < setup.angular_step_deg for h in recent)
    limit_fixed = len({h["ring_limit"] for h in recent} | {recent[-1]["next_ring_limit"]}) == 1
    best_before = min(h["resolution_A"] for h in history[:-window])
    improving = min(h["resolution_A"] for h in recent) < 0.99 * best_before
    return visited and steady and limit_fixed and not improving


def _final_maps(state, setup, params):
    """Every particle inserted once at its final orientations: final half maps, FSC and combined map."""
    backprojector = Backprojector(setup.box, symmetry_ops=setup.symmetry_ops if len(setup.symmetry_ops) > 1 else None)
    sums = [_accumulators(setup.box) for _ in (1, 2)]
    for rows, images in setup.images.chunks(params.chunk_size):
        normalised = normalise_and_mask(images, setup.mask_radius_px, edge_px=4.0, mask=False)
        ctf = None if setup.ctf is None else ctf_image(setup.ctf.take(rows), setup.box, setup.pixel_size_A, rfft=True)
        data, weights2 = backprojector.image_transforms(normalised, state.shift_px[rows], ctf)
        image_of, rotations, weights = _peak_orientations(state, rows)
        halves = setup.half[rows][image_of]
        for h in (1, 2):
            on = halves == h
            backprojector.insert_per_thread(sums[h - 1][0], sums[h - 1][1], data, weights2, rotations[on],
                                            image_of[on], weights[on])
    final = [FourierSums(U.sum(0), rho.sum(0), setup.box) for U, rho in sums]
    corners = soft_sphere_mask(setup.box, setup.box / 2.0, 3.0)
    first = [reconstruct_volume(s) * corners for s in final]
    curve = fsc(first[0] * setup.mask, first[1] * setup.mask)
    half_maps = [reconstruct_volume(s, curve) * corners for s in final]
    both = FourierSums(final[0].U + final[1].U, final[0].rho + final[1].rho, setup.box)
    volume = reconstruct_volume(both, combined_fsc(curve)) * corners
    # Reported as in every iteration: the FSC of the written (Wiener-filtered) half maps, masked.
    reported = fsc(half_maps[0] * setup.mask, half_maps[1] * setup.mask)
    return RefineResult(half_maps, volume, reported,
                        float(resolution_at(reported, 0.143, setup.box, setup.pixel_size_A)), state, setup)
