"""Numba kernel: pick, shift and CTF-weight the Fourier pixels of particle images in one pass.

Input: the ``rfft2`` of images as stored (index [y, x], image centre at pixel
N // 2, not moved to 0). Output at the m half-plane pixels (kx_j, ky_j) of
:func:`projector.image_half_plane`:

    data[i, j] = F_i(ky_j, kx_j) * exp(-2 pi i (kx_j sx_i + ky_j sy_i) / N) * CTF_i(k_j)
    ctf2[i, j] = CTF_i(k_j)^2

The phase is separable, so it is evaluated once per column and once per row of
each image. With (sx, sy) = RELION origin - N // 2 it both moves the centre to
pixel 0 (what ``ifftshift`` before the FFT would do) and applies the origin.
The CTF is RELION's (:func:`ctf.relion_ctf`, the same formula), from
per-particle terms (:func:`ctf.ctf_terms`), or read from a given rfft-layout CTF
grid, or 1.

The public wrapper with checks is :meth:`reconstruct.Backprojector.image_transforms`.
"""

import math

import numpy as np
from numba import njit, prange

from prime_plugin.core.ctf import relion_ctf_scalar


@njit(parallel=True, cache=True)
def gather_shift_ctf(spectra, rows, cols, kx, ky, row_ky, shifts_px, ctf_terms, ctf_grid, inverse_box_A,
                     data, ctf2):
    """Fill data (complex64 (n, m)) and ctf2 (float32 (n, m)) as in the module docstring.

    spectra : complex64 (n, N, N // 2 + 1), rfft2 of the images as stored.
    rows, cols : int64 (m,) where pixel j sits in ``spectra[i]``; kx, ky : float64 (m,) its frequency
    in Fourier pixels; row_ky : float64 (N,) the ky of each row.
    shifts_px : float64 (n, 2) phase shifts (x, y) in pixels (origin - N // 2).
    ctf_terms : float64 (n, 8) from :func:`ctf.ctf_terms`, or (0, 8) when not used.
    ctf_grid : float32 (n, N, N // 2 + 1) CTF in the rfft layout, or (0, 1, 1) when not used;
    with neither, CTF = 1. inverse_box_A : 1 / (N * pixel size), Fourier pixels to 1/A.
    """
    n = spectra.shape[0]
    N = spectra.shape[1]
    n_cols = spectra.shape[2]
    m = rows.shape[0]
    use_terms = ctf_terms.shape[0] > 0
    use_grid = ctf_grid.shape[0] > 0
    for i in prange(n):
        column_phase = np.empty(n_cols, np.complex128)
        row_phase = np.empty(N, np.complex128)
        for c in range(n_cols):
            angle = -2.0 * math.pi * c * shifts_px[i, 0] / N
            column_phase[c] = complex(math.cos(angle), math.sin(angle))
        for r in range(N):
            angle = -2.0 * math.pi * row_ky[r] * shifts_px[i, 1] / N
            row_phase[r] = complex(math.cos(angle), math.sin(angle))
        for j in range(m):
            r = rows[j]
            c = cols[j]
            value = spectra[i, r, c] * (column_phase[c] * row_phase[r])
            if use_terms:
                t = ctf_terms[i]
                ctf = relion_ctf_scalar(kx[j] * inverse_box_A, ky[j] * inverse_box_A, t[0], t[1], t[2], t[3],
                                        t[4], t[5], t[6], t[7])
            elif use_grid:
                ctf = ctf_grid[i, r, c]
            else:
                ctf = 1.0
            ctf32 = np.float32(ctf)
            data[i, j] = value * ctf32
            ctf2[i, j] = ctf32 * ctf32
