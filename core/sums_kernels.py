"""Numba kernels over Fourier sums: shell totals of rho and the Wiener division, without full-size temporaries.

Grids are numpy's ``rfftn`` layout of a padded volume, shape (M, M, M // 2 + 1),
z and y in FFT order. The radius of voxel (z, y, x) in unpadded Fourier pixels
is sqrt(fz^2 + fy^2 + x^2) * box / M (fz, fy signed), computed in float32; its
shell is that radius rounded half to even (numpy's ``rint``), as
:func:`reconstruct.shell_radii` gives.

Public wrappers: :func:`reconstruct.wiener_regulariser`, :func:`reconstruct.reconstruct_volume`.
"""

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _signed(index, M):
    """FFT-order index -> signed frequency (numpy's fftfreq(M, 1 / M))."""
    return index if index < (M + 1) // 2 else index - M


@njit(inline="always")
def _radius(z, y, x, M, to_unpadded):
    fz = np.float32(_signed(z, M)) * to_unpadded
    fy = np.float32(_signed(y, M)) * to_unpadded
    fx = np.float32(x) * to_unpadded
    return np.sqrt(fz * fz + fy * fy + fx * fx)


@njit(parallel=True, cache=True)
def shell_totals(rho, box, totals, counts):
    """totals[z, s] = sum of rho over plane z's voxels of shell s (float64), counts[z, s] their number.

    rho : float32 (M, M, M // 2 + 1); totals float64 and counts int64 (M, n_shells), zeroed;
    voxels of shells >= n_shells are skipped. Sum over axis 0 for the per-shell totals.
    """
    M = rho.shape[0]
    n_shells = totals.shape[1]
    to_unpadded = np.float32(box / M)
    for z in prange(M):
        for y in range(M):
            for x in range(rho.shape[2]):
                s = int(np.rint(_radius(z, y, x, M, to_unpadded)))
                if s < n_shells:
                    totals[z, s] += rho[z, y, x]
                    counts[z, s] += 1


@njit(parallel=True, cache=True)
def wiener_divide(U, rho, regulariser, box, limit_px, out):
    """out = U / (rho + regulariser[shell]) where that is > 0, else 0; 0 at radii >= limit_px.

    U : complex64 (M, M, M // 2 + 1); rho : float32, same shape; regulariser : float32
    (n_shells,) per shell (shells beyond it get its last value); out : complex64, same shape,
    may be U itself (in place).
    """
    M = U.shape[0]
    last = regulariser.shape[0] - 1
    to_unpadded = np.float32(box / M)
    limit = np.float32(limit_px)
    for z in prange(M):
        for y in range(M):
            for x in range(U.shape[2]):
                r = _radius(z, y, x, M, to_unpadded)
                s = min(int(np.rint(r)), last)
                denominator = rho[z, y, x] + regulariser[s]
                if r >= limit or not denominator > 0:
                    out[z, y, x] = 0
                else:
                    out[z, y, x] = U[z, y, x] / denominator
