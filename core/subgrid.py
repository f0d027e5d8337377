"""Sub-grid refinement of the best orientation: a quadratic fit of the correlation around it.

The search scores orientations on a grid: projection directions about ``angular_step``
apart and in-plane angles ``psi_step`` apart. Its best orientation is therefore off the
true one by up to half a step, which dominates the angular error once the data are good
(on benchmarks/bench_refine.py's data a 4x finer direction grid, --nspace 8000, lowers the
median error from 2.4 to 1.8 degrees and doubles the run time; this refinement gives 1.6
degrees for about 0.1 s per 500 particles). Around a grid maximum the correlation is smooth (the
alignment uses only frequencies below the FSC limit), so its peak can be located between
the samples instead:

- the samples are the best grid orientation A0 and its neighbouring directions, each at
  its own best in-plane angle and the in-plane angles one step either side (27 samples
  with 8 neighbours);
- each sample's rotation A (the symmetry mate nearest A0) is written as a small rotation
  in the particle frame, A = exp([w]) A0, w (3,) in radians; w_z is the in-plane angle;
- a quadratic c + g.w + w.H.w / 2 is fitted to the correlations by least squares;
- if H is negative definite, the peak w* = -H^-1 g lies within one direction step of A0
  and its predicted value beats A0's, the orientation becomes exp([w*]) A0; otherwise A0 stays.

Shapes: P particles, C candidate directions per particle (the best and its neighbours).
"""

import numpy as np
from scipy.spatial.transform import Rotation

from prime_plugin.core.correlate import paired_curves
from prime_plugin.core.geometry import euler_to_matrix, matrix_to_euler

N_COEFFICIENTS = 10  # 1 constant, 3 linear and 6 quadratic terms in (wx, wy, wz)


def quadratic_features(w):
    """Monomials (..., 10) of offsets w (..., 3): 1, wx, wy, wz, wx^2/2, wy^2/2, wz^2/2, wx wy, wx wz, wy wz."""
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    return np.stack([np.ones_like(x), x, y, z, x * x / 2, y * y / 2, z * z / 2, x * y, x * z, y * z], axis=-1)


def quadratic_peaks(w, values, radius):
    """Peak of the least-squares quadratic through samples, per particle.

    w : (P, S, 3) sample offsets (any unit); values : (P, S); radius : a peak farther than
    this from 0 (same unit) is not trusted. Returns (peak (P, 3), predicted value (P,),
    accepted bool (P,)): accepted where the fit has a maximum (negative definite Hessian)
    within ``radius``; elsewhere peak = 0 and the value is the fit's at 0.
    """
    features = quadratic_features(w)                                              # (P, S, 10)
    coefficients = np.einsum("psi,psj->pij", features, features)
    right = np.einsum("psi,ps->pi", features, values)
    fit = np.einsum("pij,pj->pi", np.linalg.pinv(coefficients), right)         # (P, 10)
    g = fit[:, 1:4]
    a, b, c, xy, xz, yz = (fit[:, k] for k in range(4, 10))
    hessian = np.stack([np.stack([a, xy, xz], -1), np.stack([xy, b, yz], -1), np.stack([xz, yz, c], -1)], -2)
    maximum = np.linalg.eigvalsh(hessian).max(axis=-1) < 0
    safe = np.where(maximum[:, None, None], hessian, -np.eye(3))
    peak = -np.linalg.solve(safe, g[..., None])[..., 0]
    predicted = fit[:, 0] + 0.5 * (g * peak).sum(-1)
    accepted = maximum & (np.linalg.norm(peak, axis=-1) <= radius) & (predicted > fit[:, 0])
    return np.where(accepted[:, None], peak, 0.0), np.where(accepted, predicted, fit[:, 0]), accepted


def nearest_mates(rotations, centre, symmetry_ops):
    """The symmetry mate A S of each rotation nearest to ``centre``: (P, C, 3, 3).

    rotations (P, C, 3, 3), centre (P, 3, 3), symmetry_ops (s, 3, 3) including the identity.
    """
    mates = np.einsum("pcij,sjk->pcsik", rotations, symmetry_ops)                  # (P, C, s, 3, 3)
    # trace(M A0^T) = sum_ij M_ij A0_ij grows as the angle between M and A0 shrinks.
    closeness = np.einsum("pcsij,pij->pcs", mates, centre)
    pick = closeness.argmax(axis=-1)
    return np.take_along_axis(mates, pick[..., None, None, None], axis=2)[:, :, 0]


def refine_best_orientations(references, neighbours, symmetry_ops, spectra, powers, ctf2, best_direction, n_rot,
                             angular_step_deg):
    """Sub-grid orientations of the particles' best grid directions (module docstring).

    references : PolarReferences (D directions); neighbours : int64 (D, k); symmetry_ops :
    (s, 3, 3). spectra (P, K, Q), powers and ctf2 (P, K): the
    particles at their final origins. best_direction : int64 (P,) grid index of each particle's
    best direction. angular_step_deg : the direction grid's step (bounds the move).
    Returns angles_deg (P, 3) (rot, tilt, psi): the fitted peak, or the best grid orientation where
    the fit is not trusted. The correlations are left as the grid's: they weight the peaks.
    """
    psi_step = 360.0 / n_rot
    candidates = np.concatenate([best_direction[:, None], neighbours[best_direction]], axis=1)   # (P, C)
    curves = paired_curves(references.spectra[candidates], references.powers[candidates], spectra, powers, ctf2,
                           n_rot)                                                                # (P, C, n_rot)
    best_psi = curves.argmax(-1)                                                                 # (P, C)
    psi_samples = (best_psi[..., None] + np.array([-1, 0, 1])) % n_rot                            # (P, C, 3)
    values = np.take_along_axis(curves, psi_samples, -1)                                         # (P, C, 3)

    rot, tilt = references.directions_deg[candidates, 0], references.directions_deg[candidates, 1]
    at_best_psi = nearest_mates(euler_to_matrix(rot, tilt, best_psi * psi_step).reshape(*rot.shape, 3, 3),
                                euler_to_matrix(rot[:, 0], tilt[:, 0], best_psi[:, 0] * psi_step), symmetry_ops)
    centre = at_best_psi[:, 0]
    # A change of psi by d is Rz(d) on the left, whatever the symmetry mate.
    in_plane = euler_to_matrix(0.0, 0.0, np.array([-1.0, 0.0, 1.0]) * psi_step)                 # (3, 3, 3)
    samples = np.einsum("mij,pcjk->pcmik", in_plane, at_best_psi)                                 # (P, C, 3, 3, 3)
    relative = np.einsum("pcmij,pkj->pcmik", samples, centre)                                     # A A0^T
    w = Rotation.from_matrix(relative.reshape(-1, 3, 3)).as_rotvec().reshape(*values.shape, 3)
    step = np.radians(angular_step_deg)
    flat_w, flat_v = w.reshape(len(w), -1, 3) / step, values.reshape(len(values), -1)
    peak, _, _ = quadratic_peaks(flat_w, flat_v, radius=1.0)  # peak 0 where the fit is not accepted
    moved = Rotation.from_rotvec(peak * step).as_matrix() @ centre
    return np.stack(matrix_to_euler(moved), axis=-1)
