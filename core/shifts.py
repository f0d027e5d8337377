"""Origin shift refinement: L-BFGS-B with the analytical gradient, interleaved with the psi search.

For a particle X and its reference Y rotated to in-plane index m (Y_m), shifting the
particle by s = (x0, y0) px (RELION origin: the particle is centred by it) gives

    lambda(s)      = 2 sum_k sum_n Re[ Z(k, n) exp(i (t_x x0 + t_y y0)) ] / Nrm,   Z = Y_m conj X
    d lambda / dx0 = -2 sum Im[ Z exp(i ...) ] t_x / Nrm   (likewise y0 with t_y)

over the stored half rings (n < n_rot/2; the other half doubles the sum), with
t = 2 pi k (cos phi, sin phi) / N. Procedure (ALGORITHM.md section 3): best psi at the
start shift; one bounded L-BFGS-B minimisation of -lambda over the shift (bounds
+/- trs px around the start); best psi again at the new shift; repeat while psi changes.
"""

import numpy as np
import scipy.optimize

from prime_plugin.core.correlate import ring_spectra
from prime_plugin.core.polar import apply_shifts


def rotated_half_rings(sections, m):
    """Y(k, n + m) for n < n_rot/2 from half rings (..., K, h), with the Friedel conj for the other half.

    m : an in-plane index, or int (P,) one per leading row of ``sections`` (P, K, h).
    """
    h = sections.shape[-1]
    full = np.concatenate([sections, np.conj(sections)], axis=-1)
    m = np.asarray(m, np.int64)
    index = (np.arange(h) + m[..., None, None]) % (2 * h)
    return np.take_along_axis(full, np.broadcast_to(index, sections.shape), axis=-1)


def shift_objective(product, t_x, t_y, norm):
    """(f, grad) of f(s) = -lambda(s) for Z = Y_m conj X (K, h) and phase factors (K, h)."""
    z = product.ravel()
    tx = t_x.ravel()
    ty = t_y.ravel()

    def objective(s):
        w = z * np.exp(1j * (tx * s[0] + ty * s[1]))
        value = 2.0 * w.real.sum() / norm
        grad = np.array([-2.0 * (w.imag * tx).sum(), -2.0 * (w.imag * ty).sum()]) / norm
        return -value, -grad

    return objective


def best_psi(reference, particle_centred, norm, n_rot):
    """Best in-plane index and correlation of one pair, by one inverse FFT over all angles."""
    cross = (ring_spectra(reference[None])[0] * np.conj(ring_spectra(particle_centred[None])[0])).sum(axis=0)
    lam = np.fft.irfft(cross, n=n_rot) / norm
    m = int(lam.argmax())
    return m, float(lam[m])


def refine_shift(reference, particle, norm, grid, start_px, trs_px, max_rounds=5, method="L-BFGS-B"):
    """Refine the origin (x0, y0) px of one particle against one reference direction.

    reference, particle : complex (K, n_rot/2) half rings (particle CTF-multiplied, not shifted);
    norm : the pair's normaliser; start_px : (2,) start origin; trs_px : half-width of the box bounds.
    method : "L-BFGS-B" (analytical gradient) or "Nelder-Mead" (for comparison; bounds as well).
    Returns (shift_px (2,), psi_index, correlation, function_evaluations).
    """
    t_x, t_y = grid.shift_factors()
    start = np.asarray(start_px, dtype=np.float64)
    bounds = [(start[0] - trs_px, start[0] + trs_px), (start[1] - trs_px, start[1] + trs_px)]
    shift = start.copy()
    m, value = best_psi(reference, apply_shifts(particle[None], grid, shift)[0], norm, grid.n_rot)
    evaluations = 0
    for _ in range(max_rounds):
        objective = shift_objective(rotated_half_rings(reference, m) * np.conj(particle), t_x, t_y, norm)
        if method == "L-BFGS-B":
            result = scipy.optimize.minimize(objective, shift, jac=True, method="L-BFGS-B", bounds=bounds,
                                             options={"maxcor": 15, "maxiter": 60})
        else:
            result = scipy.optimize.minimize(lambda s: objective(s)[0], shift, method="Nelder-Mead",
                                             bounds=bounds, options={"xatol": 1e-3, "fatol": 1e-7})
        evaluations += result.nfev
        shift = np.clip(result.x, [b[0] for b in bounds], [b[1] for b in bounds])
        new_m, new_value = best_psi(reference, apply_shifts(particle[None], grid, shift)[0], norm, grid.n_rot)
        if new_m == m:
            value = max(new_value, -float(result.fun))
            break
        m, value = new_m, new_value
    return shift, m, value, evaluations
