"""Orientation search over polar references: exhaustive (greedy) and stochastic hill climbing.

Every (particle, direction) pair is scored by its best in-plane correlation
(:mod:`correlate`). Exhaustive search scores all directions. Stochastic hill
climbing (SHC, ALGORITHM.md section 4) re-scores each particle's previous
orientation (lambda_prev), then visits directions in a random order (the previous
direction last) and stops at the first whose best-psi correlation exceeds
lambda_prev. Evaluation is blocked: a chunk of particles shares one random order
(each particle's order is still uniformly random) so that a block of directions is
scored against all still-searching particles as one matrix product; the first
improvement in the order is accepted, so the semantics are those of one-by-one
visiting. The n_peaks best visited orientations are kept with softmax weights.
"""

from dataclasses import dataclass

import numpy as np
import scipy.fft
from prime_plugin.core.correlate import (best_rotations_prepared, normalisers, paired_curves, particle_operand,
                                         reference_operand, ring_powers, ring_spectra)
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.local_search import local_candidates, local_search
from prime_plugin.core.pipelines import map_tiles, single_threaded_blas
from prime_plugin.core.polar import reference_sections
from prime_plugin.core.shifts import refine_shift
from prime_plugin.core.subgrid import refine_best_orientations


@dataclass
class PolarReferences:
    """Polar central sections of one map for D directions (psi = 0).

    directions_deg : (D, 2) (rot, tilt); sections complex64 (D, K, h); spectra (D, K, h + 1); powers (D, K).
    """

    directions_deg: np.ndarray
    sections: np.ndarray
    spectra: np.ndarray
    powers: np.ndarray

    @classmethod
    def from_projector(cls, projector, directions_deg, grid):
        directions_deg = np.asarray(directions_deg, np.float64)
        rotations = euler_to_matrix(directions_deg[:, 0], directions_deg[:, 1], 0.0)
        sections = reference_sections(projector, rotations, grid)
        return cls(directions_deg, sections, ring_spectra(sections), ring_powers(sections))

    def __len__(self):
        return len(self.directions_deg)


@dataclass
class SearchResult:
    """Per particle: the best orientation, its n_peaks neighbours with weights, and the search effort.

    direction (P,) index into the references; psi_index (P,); shift_px (P, 2) RELION origins;
    correlation (P,); peak_directions, peak_psi, peak_correlations, peak_weights (P, n_peaks)
    (best first); fraction_visited (P,) of the directions; best_angles_deg (P, 3) (rot, tilt, psi)
    the best orientation refined between the grid points (:mod:`subgrid`), or None.
    """

    direction: np.ndarray
    psi_index: np.ndarray
    shift_px: np.ndarray
    correlation: np.ndarray
    peak_directions: np.ndarray
    peak_psi: np.ndarray
    peak_correlations: np.ndarray
    peak_weights: np.ndarray
    fraction_visited: np.ndarray
    best_angles_deg: np.ndarray = None


def softmax_weights(correlations, sigma=0.005):
    """tau_j = exp(-(1 - lambda_j) / sigma) normalised over each row; zero where lambda <= 0 (P, n)."""
    lam = np.asarray(correlations, np.float64)
    logits = np.where(lam > 0, -(1.0 - lam) / sigma, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(logits - top)
    total = w.sum(axis=1, keepdims=True)
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)


def _block_scores(references, rows, particle_op, powers, ctf2, n_rot):
    """Best psi index and value for references ``rows`` x particles: (B, P) each.

    particle_op : the particles' operand (:func:`correlate.particle_operand`), (Q, K, P).
    """
    norms = normalisers(references.powers[rows], powers, ctf2)
    return best_rotations_prepared(reference_operand(references.spectra[rows]), particle_op, norms, n_rot)


def _merge_peaks(best, values, psi, rows, n_peaks):
    """Merge block candidates (B, P) into the running top lists (P, n_peaks) of (value, dir, psi)."""
    top_v, top_d, top_p = best
    v = np.concatenate([top_v, values.T], axis=1)
    d = np.concatenate([top_d, np.broadcast_to(rows[None, :], values.T.shape)], axis=1)
    p = np.concatenate([top_p, psi.T], axis=1)
    order = np.argsort(-v, axis=1, kind="stable")[:, :n_peaks]
    return (np.take_along_axis(v, order, 1), np.take_along_axis(d, order, 1), np.take_along_axis(p, order, 1))


def _empty_peaks(n_particles, n_peaks):
    return (np.full((n_particles, n_peaks), -np.inf, np.float32), np.full((n_particles, n_peaks), -1, np.int64),
            np.zeros((n_particles, n_peaks), np.int64))


def shift_candidates(radius_px, step_px):
    """Offsets (S, 2) px on a square grid of ``step_px`` within a disc of ``radius_px``, (0, 0) first."""
    if not radius_px or not step_px:
        return np.zeros((1, 2))
    n = int(np.floor(radius_px / step_px))
    axis = np.arange(-n, n + 1) * step_px
    grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    grid = grid[np.hypot(grid[:, 0], grid[:, 1]) <= radius_px + 1e-9]
    return grid[np.argsort(np.hypot(grid[:, 0], grid[:, 1]), kind="stable")]


def exhaustive_search(references, particles, grid, shifts_px, n_peaks=1, block=32, offsets_px=None,
                      directions=None):
    """Score every direction (or the subset ``directions``) for every particle at its shift
    (plus each of ``offsets_px`` (S, 2)).

    Returns the n_peaks best (value, direction, psi) per particle, the shift of the best
    peak (P, 2), and the fraction of all directions visited.
    """
    offsets_px = np.zeros((1, 2)) if offsets_px is None else np.asarray(offsets_px, np.float64)
    directions = np.arange(len(references)) if directions is None else np.asarray(directions, np.int64)
    best = _empty_peaks(len(shifts_px), n_peaks)
    best_shift = np.array(shifts_px, np.float64)
    blocks = [directions[start:start + block] for start in range(0, len(directions), block)]
    for offset in offsets_px:
        operand = particle_operand(particles.centred_spectra(grid, shifts_px + offset))
        scores = map_tiles(lambda rows: _block_scores(references, rows, operand, particles.powers, particles.ctf2,
                                                      grid.n_rot), blocks)
        for rows, (psi, values) in zip(blocks, scores):
            previous_top = best[0][:, 0].copy()
            best = _merge_peaks(best, values, psi, rows, n_peaks)
            improved = best[0][:, 0] > previous_top
            best_shift[improved] = shifts_px[improved] + offset
    return best, best_shift, np.full(len(shifts_px), len(directions) / len(references))


def previous_scores(references, spectra, powers, ctf2, directions, psi_index, n_rot):
    """lambda of each particle at its own previous (direction, psi), (P,)."""
    ref = references.spectra[directions]
    cross = (ref * np.conj(spectra)).sum(axis=1)
    lam = scipy.fft.irfft(cross, n=n_rot, axis=-1)
    norms = np.sqrt(np.maximum((references.powers[directions] * ctf2).sum(1) * powers.sum(1), 1e-30))
    return lam[np.arange(len(lam)), psi_index] / norms


def shc_search(references, particles, grid, shifts_px, previous_direction, previous_psi, rng,
               n_peaks=1, block=64):
    """Stochastic hill climbing from previous orientations; returns (peaks, fraction_visited)."""
    spectra, powers = particles.centred_spectra(grid, shifts_px), particles.powers
    n_particles, n_dirs = len(spectra), len(references)
    previous_direction = np.asarray(previous_direction, np.int64)
    previous_psi = np.asarray(previous_psi, np.int64)
    prev = previous_scores(references, spectra, powers, particles.ctf2, previous_direction, previous_psi, grid.n_rot)
    best = _empty_peaks(n_particles, n_peaks)
    best[0][:, 0], best[1][:, 0], best[2][:, 0] = prev, previous_direction, previous_psi
    visited = np.zeros(n_particles)
    searching = np.ones(n_particles, bool)
    order = rng.permutation(n_dirs)
    for start in range(0, n_dirs, block):
        active = np.flatnonzero(searching)
        if active.size == 0:
            break
        rows = order[start:start + block]
        psi, values = _block_scores(references, rows, particle_operand(spectra[active]), powers[active],
                                    particles.ctf2[active], grid.n_rot)
        own = rows[:, None] == previous_direction[active][None, :]
        values = np.where(own, -np.inf, values)  # the previous direction is scored last, below
        better = values > prev[active][None, :]
        found = better.any(axis=0)
        first = np.where(found, better.argmax(axis=0), len(rows) - 1)
        seen = np.arange(len(rows))[:, None] <= first[None, :]
        merged = _merge_peaks(tuple(a[active] for a in best), np.where(seen, values, -np.inf), psi, rows, n_peaks)
        for target, source in zip(best, merged):
            target[active] = source
        visited[active] += first + 1
        searching[active[found]] = False
    return best, np.minimum(visited, n_dirs) / n_dirs


def local_ascent(references, neighbours, spectra, powers, ctf2, peaks, n_rot, max_steps=10):
    """Steepest ascent over neighbouring directions from each particle's best peak, in place.

    neighbours : (D, k) from :func:`directions.direction_neighbours`. Each step scores the
    k neighbours of every particle's current best direction (all in-plane angles) and moves
    to the best if it improves; stops when no particle moves. Returns directions scored (P,).
    """
    values, directions, psi = peaks
    scored = np.zeros(len(values))
    moving = np.arange(len(values))
    for _ in range(max_steps):
        if moving.size == 0:
            break
        candidates = neighbours[directions[moving, 0]]                                  # (p, k)
        lam = paired_curves(references.spectra[candidates], references.powers[candidates], spectra[moving],
                            powers[moving], ctf2[moving], n_rot)                          # (p, k, n_rot)
        best_psi = lam.argmax(-1)
        best = np.take_along_axis(lam, best_psi[..., None], -1)[..., 0]
        pick = best.argmax(1)
        value = best[np.arange(len(moving)), pick]
        scored[moving] += candidates.shape[1]
        improved = value > values[moving, 0]
        rows = moving[improved]
        values[rows, 0] = value[improved]
        directions[rows, 0] = candidates[improved, pick[improved]]
        psi[rows, 0] = best_psi[improved, pick[improved]]
        moving = rows
    return scored


def search_particles(references, particles, grid, shifts_px, rng, previous=None, n_peaks=1, sigma=0.005,
                     trs_px=None, shift_step_px=1.0, refine_shifts=True, neighbours=None, coarse=None,
                     subgrid=None, local=None):
    """Search orientations (SHC from ``previous`` = (direction, psi) arrays, local around ``local``'s
    orientations, else exhaustive) and shifts.

    shifts_px : (P, 2) start origins. trs_px : shift search radius (px; None or 0: no shift search).
    The exhaustive search also tries start + offsets on a ``shift_step_px`` grid within trs_px;
    L-BFGS-B then refines within +/- shift_step_px of the best grid point (SHC: of the start).
    neighbours : (D, k) direction neighbour table; with it, SHC's accepted direction is
    polished by steepest ascent over neighbouring directions (:func:`local_ascent`).
    coarse : indices of a coarser subset of the directions; with it (and ``neighbours``) the
    exhaustive search scores only that subset, then climbs the full grid from its best.
    subgrid : (symmetry_ops (s, 3, 3), angular_step_deg of the direction grid); with it (and
    ``neighbours``) the best orientation is also refined between the grid points
    (:func:`subgrid.refine_best_orientations`), returned as ``best_angles_deg``.
    local : (centre_angles_deg (P, 3), symmetry_ops (s, 3, 3), window_deg): score only the grid
    orientations within window_deg of each particle's centre orientation
    (:mod:`~prime_plugin.core.local_search`), at the origins of the offset grid, then as above.
    """
    shifts_px = np.asarray(shifts_px, np.float64).reshape(-1, 2)
    if local is not None:
        centre_angles_deg, symmetry_ops, window_deg = local
        candidates, allowed = local_candidates(centre_angles_deg, references.directions_deg, symmetry_ops,
                                               window_deg, grid.n_rot)
        offsets = shift_candidates(trs_px, shift_step_px) if refine_shifts else np.zeros((1, 2))
        peaks, start_shifts, fraction = local_search(references, particles, grid, shifts_px, candidates, allowed,
                                                     offsets, n_peaks)
    elif previous is None:
        offsets = shift_candidates(trs_px, shift_step_px) if refine_shifts else None
        peaks, start_shifts, fraction = exhaustive_search(references, particles, grid, shifts_px, n_peaks,
                                                          offsets_px=offsets, directions=coarse)
        if coarse is not None and neighbours is not None:
            spectra = particles.centred_spectra(grid, start_shifts)
            scored = local_ascent(references, neighbours, spectra, particles.powers, particles.ctf2, peaks, grid.n_rot)
            fraction = np.minimum(fraction + scored / len(references), 1.0)
    else:
        peaks, fraction = shc_search(references, particles, grid, shifts_px, previous[0], previous[1], rng, n_peaks)
        if neighbours is not None:
            spectra, powers = particles.centred_spectra(grid, shifts_px), particles.powers
            scored = local_ascent(references, neighbours, spectra, powers, particles.ctf2, peaks, grid.n_rot)
            fraction = np.minimum(fraction + scored / len(references), 1.0)
        start_shifts = shifts_px
    values, directions, psi = (np.array(a) for a in peaks)
    shifts = start_shifts.copy()
    if refine_shifts and trs_px:
        with single_threaded_blas():
            _refine_origins(references, particles, grid, directions, psi, values, start_shifts, shifts, shift_step_px)
    weights = softmax_weights(values, sigma)
    best_angles = None
    if subgrid is not None and neighbours is not None:
        symmetry_ops, angular_step_deg = subgrid
        spectra = particles.centred_spectra(grid, shifts)
        best_angles = refine_best_orientations(references, neighbours, symmetry_ops, spectra, particles.powers,
                                               particles.ctf2, directions[:, 0], grid.n_rot, angular_step_deg)
    return SearchResult(directions[:, 0], psi[:, 0], shifts, values[:, 0], directions, psi, values, weights,
                        fraction, best_angles)


def _refine_origins(references, particles, grid, directions, psi, values, start_shifts, shifts, step_px):
    """L-BFGS-B origin refinement of each particle at its best orientation (:func:`refine_shift`, bounds
    +-step_px around its start): ``shifts``, ``psi`` and ``values`` (best peak, column 0) updated in place
    where the refined origin correlates better."""
    for i in range(len(shifts)):
        j = directions[i, 0]
        norm = float(np.sqrt(max((references.powers[j] * particles.ctf2[i]).sum()
                                 * particles.powers[i].sum(), 1e-30)))
        shift, m, value, _ = refine_shift(references.sections[j], particles.sections[i], norm, grid,
                                          start_shifts[i], step_px)
        if value >= values[i, 0]:
            shifts[i], psi[i, 0], values[i, 0] = shift, m, value
