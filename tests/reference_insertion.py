"""Test oracle: the straightforward insertion kernel (one point at a time, serial, no flipping, no slabs).

This is the kernel :mod:`prime_plugin.core.insertion_kernels` replaced; kept
here, written for clarity rather than speed, so that tests can check the fast
insertion gives the same sums. Same conventions as that module: half grid
(M, M, M // 2 + 1), points in padded-grid units (x, y, z), normalised separable
kernel weights, contributions at negative x folded onto their Friedel mates
(both at x = 0 and x = M / 2).
"""

import numpy as np
from numba import njit

from prime_plugin.core.fourier_grid_kernels import as_kernel_args
from prime_plugin.core.projector import image_half_plane


@njit
def _weight(distance, table, inv_step):
    t = abs(distance) * inv_step
    i = int(t)
    frac = t - i
    return table[i] * (1.0 - frac) + table[i + 1] * frac


@njit
def _insert_one(U, rho, px, py, pz, value_re, value_im, weight2, width, table, inv_step):
    M = U.shape[0]
    half_m = M // 2
    half_w = 0.5 * width
    x0 = int(np.floor(px - half_w)) + 1
    y0 = int(np.floor(py - half_w)) + 1
    z0 = int(np.floor(pz - half_w)) + 1
    sx = sy = sz = 0.0
    for t in range(width):
        sx += _weight(x0 + t - px, table, inv_step)
        sy += _weight(y0 + t - py, table, inv_step)
        sz += _weight(z0 + t - pz, table, inv_step)
    norm = 1.0 / (sx * sy * sz)
    for tz in range(width):
        gz = z0 + tz
        for ty in range(width):
            gy = y0 + ty
            for tx in range(width):
                w = norm * (_weight(gz - pz, table, inv_step) * _weight(gy - py, table, inv_step)
                            * _weight(x0 + tx - px, table, inv_step))
                gx = (x0 + tx + half_m - 1) % M - half_m + 1  # folded into (-M/2, M/2]
                if gx >= 0:
                    U[gz % M, gy % M, gx] += complex(w * value_re, w * value_im)
                    rho[gz % M, gy % M, gx] += w * weight2
                if gx <= 0 or gx == half_m:
                    mate_x = -gx if gx <= 0 else gx
                    U[(-gz) % M, (-gy) % M, mate_x] += complex(w * value_re, -w * value_im)
                    rho[(-gz) % M, (-gy) % M, mate_x] += w * weight2


@njit
def _insert_all(U, rho, data, ctf2, image_of, rotations, weights, kx, ky, column_weight, scale, width, table,
                inv_step):
    for o in range(rotations.shape[0]):
        a = rotations[o]
        i = image_of[o]
        for j in range(kx.shape[0]):
            c = weights[o] * column_weight[j]
            u = kx[j] * scale
            v = ky[j] * scale
            px = a[0, 0] * u + a[1, 0] * v
            py = a[0, 1] * u + a[1, 1] * v
            pz = a[0, 2] * u + a[1, 2] * v
            value = data[i, j]
            _insert_one(U, rho, px, py, pz, c * value.real, c * value.imag, c * ctf2[i, j], width, table, inv_step)


def reference_insert(box, padding, kernel, data, ctf2, rotations, image_of, weights, max_radius_px=None):
    """(U complex128, rho float64), shape (M, M, M // 2 + 1): the sums of the data inserted one point at a time.

    data complex (n, m) and ctf2 (n, m) at the pixels of ``image_half_plane(box, max_radius_px)``;
    rotations (k, 3, 3); image_of (k,) int; weights (k,). Accumulates in double precision.
    """
    kx, ky, _, column_weight = image_half_plane(box, max_radius_px)
    M = int(round(padding * box))
    U = np.zeros((M, M, M // 2 + 1), np.complex128)
    rho = np.zeros(U.shape, np.float64)
    width, table, inv_step = as_kernel_args(kernel)
    _insert_all(U, rho, np.asarray(data, np.complex128), np.asarray(ctf2, np.float64), np.asarray(image_of, np.int64),
                np.asarray(rotations, np.float64), np.asarray(weights, np.float64), kx.astype(np.float64),
                ky.astype(np.float64), column_weight.astype(np.float64), float(padding), width, table, inv_step)
    return U, rho
