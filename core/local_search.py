"""Local orientation search: every particle scored only near a given orientation (``prime refine --local``).

A local refinement starts from orientations that an earlier refinement or a classification
found (the input STAR file's rlnAngleRot/Tilt/Psi). Each particle is then scored only at the
grid orientations within ``window_deg`` of its input orientation (the smallest rotation angle
over the point group's mates A S, as :func:`~prime_plugin.core.geometry.rotation_angles_deg`
measures it): the directions of the grid near it, and at each of them only the in-plane angles
within the window; at every origin of an offset grid around the input origin. Nothing else is
scored, so a local refinement cannot jump to an unrelated orientation and costs a fraction of
an exhaustive search.

The in-plane geometry: for a grid direction with matrix A_d (psi = 0) the orientation at
in-plane angle psi is Rz(psi) A_d, and for a mate M of the input rotation
trace(Rz(psi) A_d M^T) = a cos(psi) + b sin(psi) + c, with a, b, c from A_d and M alone.
Its maximum over psi, hypot(a, b) + c, gives the direction's smallest angle to the input
(cos angle = (trace - 1) / 2), and the same expression tells which in-plane angles lie within
the window.
"""

import numpy as np

from prime_plugin.core.correlate import paired_curves
from prime_plugin.core.geometry import euler_to_matrix

_PARTICLE_BLOCK = 64  # particles whose candidate directions are chosen at once (P x D x s arrays)
_SCORE_BLOCK = 8  # particles scored at once (their candidates' reference spectra are gathered)


def in_plane_terms(centre_rotations, directions_deg, symmetry_ops):
    """(a, b, c) float64 (P, D, s) each: trace(Rz(psi) A_d (R_p S)^T) = a cos psi + b sin psi + c.

    centre_rotations (P, 3, 3) RELION matrices; directions_deg (D, 2) (rot, tilt) of the grid;
    symmetry_ops (s, 3, 3) with the identity.
    """
    direction_matrices = euler_to_matrix(directions_deg[:, 0], directions_deg[:, 1], 0.0).reshape(-1, 3, 3)
    quarter_turn = euler_to_matrix(0.0, 0.0, 90.0)  # Rz(90 deg)
    turned = np.einsum("ij,djk->dik", quarter_turn, direction_matrices)
    mates = np.einsum("pij,sjk->psik", centre_rotations, symmetry_ops)                       # (P, s, 3, 3)
    c = np.einsum("dj,psj->pds", direction_matrices[:, 2], mates[:, :, 2])
    a = np.einsum("dij,psij->pds", direction_matrices, mates) - c
    b = np.einsum("dij,psij->pds", turned, mates) - c
    return a, b, c


def local_candidates(centre_angles_deg, directions_deg, symmetry_ops, window_deg, n_rot):
    """The grid orientations within ``window_deg`` of each particle's orientation.

    centre_angles_deg (P, 3) (rot, tilt, psi); directions_deg (D, 2); symmetry_ops (s, 3, 3);
    n_rot in-plane angles 360 / n_rot degrees apart. Returns candidates int64 (P, k), the
    directions with at least one orientation inside the window (padded by repeating the first),
    and allowed bool (P, k, n_rot), which in-plane angles of each candidate lie inside it (False
    on the padding). Every particle keeps at least its nearest grid orientation, however small
    the window.
    """
    centre_angles_deg = np.asarray(centre_angles_deg, np.float64).reshape(-1, 3)
    centres = euler_to_matrix(*centre_angles_deg.T).reshape(-1, 3, 3)
    min_trace = 1.0 + 2.0 * np.cos(np.radians(window_deg))
    psi = np.radians(np.arange(n_rot) * 360.0 / n_rot)
    picked, terms = [], []
    for start in range(0, len(centres), _PARTICLE_BLOCK):
        a, b, c = in_plane_terms(centres[start:start + _PARTICLE_BLOCK], directions_deg, symmetry_ops)
        best_trace = np.hypot(a, b) + c                                                        # (p, D, s)
        mate = best_trace.argmax(axis=2)
        best_trace = np.take_along_axis(best_trace, mate[..., None], 2)[..., 0]             # (p, D)
        nearest = best_trace.argmax(axis=1)
        for i in range(len(best_trace)):
            rows = np.flatnonzero(best_trace[i] >= min_trace)
            rows = rows if rows.size else nearest[i:i + 1]
            s = mate[i, rows]
            picked.append(rows)
            terms.append(np.stack([a[i, rows, s], b[i, rows, s], c[i, rows, s]], axis=-1))
    k = max(len(rows) for rows in picked)
    candidates = np.empty((len(picked), k), np.int64)
    allowed = np.zeros((len(picked), k, n_rot), bool)
    for i, (rows, abc) in enumerate(zip(picked, terms)):
        candidates[i, :len(rows)], candidates[i, len(rows):] = rows, rows[0]
        trace = abc[:, 0, None] * np.cos(psi) + abc[:, 1, None] * np.sin(psi) + abc[:, 2, None]
        inside = trace >= min_trace
        # the in-plane angle nearest to the best one stays, so that no candidate is empty
        nearest_psi = np.rint(np.degrees(np.arctan2(abc[:, 1], abc[:, 0])) * n_rot / 360.0).astype(np.int64) % n_rot
        inside[np.arange(len(rows)), nearest_psi] = True
        allowed[i, :len(rows)] = inside
    return candidates, allowed


def local_search(references, particles, grid, shifts_px, candidates, allowed, offsets_px, n_peaks=1):
    """Score each particle's candidate orientations at its origin plus each offset.

    references : PolarReferences; particles : PolarParticles (P); shifts_px (P, 2) the origins
    the offsets are added to; candidates (P, k), allowed (P, k, n_rot) from
    :func:`local_candidates`; offsets_px (S, 2) px. Returns ((values, directions, psi), each
    (P, n_peaks), best first; a missing peak has direction -1), the origin of the best (P, 2)
    and the fraction of the directions scored (P,).
    """
    shifts_px = np.asarray(shifts_px, np.float64).reshape(-1, 2)
    n_particles, n_rot = len(shifts_px), grid.n_rot
    values = np.full((n_particles, n_peaks), -np.inf)
    directions = np.full((n_particles, n_peaks), -1, np.int64)
    psi = np.zeros((n_particles, n_peaks), np.int64)
    best_shifts = shifts_px.copy()
    for start in range(0, n_particles, _SCORE_BLOCK):
        rows = np.arange(start, min(start + _SCORE_BLOCK, n_particles))
        block = particles.take(rows)
        cands = candidates[rows]
        spectra, powers = references.spectra[cands], references.powers[cands]                 # (b, k, K, Q)
        for offset in offsets_px:
            lam = paired_curves(spectra, powers, block.centred_spectra(grid, shifts_px[rows] + offset),
                                block.powers, block.ctf2, n_rot)                               # (b, k, n_rot)
            lam = np.where(allowed[rows], lam, -np.inf)
            best_psi = lam.argmax(-1)
            best = np.take_along_axis(lam, best_psi[..., None], -1)[..., 0]                  # (b, k)
            previous_top = values[rows, 0].copy()
            merged = [np.concatenate(pair, axis=1) for pair in
                      ((values[rows], best), (directions[rows], cands), (psi[rows], best_psi))]
            by_value = np.argsort(-merged[0], axis=1, kind="stable")
            merged_v, merged_d, merged_p = (np.take_along_axis(m, by_value, 1) for m in merged)
            # one peak per direction (the padding, and other offsets, repeat directions): its best
            merged_v = np.where(_repeats(merged_d), -np.inf, merged_v)
            order = np.argsort(-merged_v, axis=1, kind="stable")[:, :n_peaks]
            values[rows] = np.take_along_axis(merged_v, order, 1)
            directions[rows] = np.take_along_axis(merged_d, order, 1)
            psi[rows] = np.take_along_axis(merged_p, order, 1)
            improved = values[rows, 0] > previous_top
            best_shifts[rows[improved]] = shifts_px[rows[improved]] + offset
    directions = np.where(np.isfinite(values), directions, -1)
    scored = np.array([len(np.unique(c)) for c in candidates], np.float64)
    return (values, directions, psi), best_shifts, scored / len(references)


def _repeats(directions):
    """True where a row's direction already appeared earlier in the row (int (P, n) -> bool (P, n))."""
    order = np.argsort(directions, axis=1, kind="stable")
    ranked = np.take_along_axis(directions, order, 1)
    repeated_sorted = np.zeros_like(ranked, bool)
    repeated_sorted[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeated = np.empty_like(repeated_sorted)
    np.put_along_axis(repeated, order, repeated_sorted, 1)
    return repeated
