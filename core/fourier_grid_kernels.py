"""Numba kernels: read from and write into a half 3D Fourier grid with a separable kernel.

The grid is numpy's ``rfftn`` layout of a real padded volume: ``F[z, y, x]`` of
shape (M, M, M // 2 + 1), frequencies along z and y in FFT order (index mod M),
x from 0 to M / 2. Values at negative x are the complex conjugates of their
Friedel mates, ``F(-g) = conj F(g)``. Points are given in padded-grid units as
(x, y, z). The kernel is tabulated: ``table[i]`` = w(i * step), linear in between.

Public wrappers with checks live in :mod:`projector` and :mod:`reconstruct`; the
insertion (the adjoint of sampling) is in :mod:`insertion_kernels`.
"""

import numba
import numpy as np
from numba import njit, prange


@njit(inline="always")
def kernel_weight(distance, table, inv_step):
    t = abs(distance) * inv_step
    i = int(t)
    frac = t - i
    return table[i] * (1.0 - frac) + table[i + 1] * frac


@njit(inline="always")
def _fold_x(gx, M):
    """Frequency index gx (within one period of the range) reduced to (-M/2, M/2]."""
    half = M // 2
    if gx > half:
        return gx - M
    if gx <= -half:
        return gx + M
    return gx


@njit(inline="always")
def wrap_index(index, M):
    """index mod M for index in [-M, 2M)."""
    if index < 0:
        return index + M
    if index >= M:
        return index - M
    return index


@njit(inline="always")
def axis_weights(first_offset, width, table, inv_step, out):
    """out[t] = w(first_offset + t) for t < width; returns their sum."""
    total = 0.0
    for t in range(width):
        out[t] = kernel_weight(first_offset + t, table, inv_step)
        total += out[t]
    return total


@njit(inline="always")  # a call per point, not inlined, costs three times the interpolation itself
def _sample_one(F, px, py, pz, width, table, inv_step, wx, wy, wz, iy, iz, niy, niz):
    """F at (px, py, pz) (padded-grid units), normalised kernel weights; wx..niz: scratch (width,)."""
    M = F.shape[0]
    half_w = 0.5 * width
    x0 = int(np.floor(px - half_w)) + 1
    y0 = int(np.floor(py - half_w)) + 1
    z0 = int(np.floor(pz - half_w)) + 1
    norm = 1.0 / (axis_weights(x0 - px, width, table, inv_step, wx) * axis_weights(y0 - py, width, table, inv_step, wy)
                  * axis_weights(z0 - pz, width, table, inv_step, wz))
    # Rows of the taps and of their Friedel mates (used where x folds to negative).
    for t in range(width):
        iy[t] = wrap_index(y0 + t, M)
        iz[t] = wrap_index(z0 + t, M)
        niy[t] = wrap_index(-(y0 + t), M)
        niz[t] = wrap_index(-(z0 + t), M)
    re = 0.0
    im = 0.0
    for tx in range(width):
        gx = _fold_x(x0 + tx, M)
        if gx >= 0:
            for tz in range(width):
                for ty in range(width):
                    w = wx[tx] * wz[tz] * wy[ty]
                    value = F[iz[tz], iy[ty], gx]
                    re += w * value.real
                    im += w * value.imag
        else:
            for tz in range(width):
                for ty in range(width):
                    w = wx[tx] * wz[tz] * wy[ty]
                    value = F[niz[tz], niy[ty], -gx]
                    re += w * value.real
                    im -= w * value.imag
    return re * norm, im * norm


@njit(parallel=True, cache=True, fastmath=True)
def sample_sections(F, rotations, kx, ky, scale, width, table, inv_step, out):
    """out[i, j] = F at scale * A_i^T (kx_j, ky_j, 0), for rotations (n, 3, 3) and points (m,).

    ``kx``, ``ky`` in image Fourier pixels; ``scale`` = padding factor; ``out`` complex64 (n, m).
    """
    n = rotations.shape[0]
    m = kx.shape[0]
    for i in prange(n):
        a = rotations[i]
        weights = np.empty((3, width))
        rows = np.empty((4, width), np.int64)
        for j in range(m):
            u = kx[j] * scale
            v = ky[j] * scale
            px = a[0, 0] * u + a[1, 0] * v
            py = a[0, 1] * u + a[1, 1] * v
            pz = a[0, 2] * u + a[1, 2] * v
            re, im = _sample_one(F, px, py, pz, width, table, inv_step, weights[0], weights[1], weights[2],
                                 rows[0], rows[1], rows[2], rows[3])
            out[i, j] = complex(re, im)


def thread_count():
    """Number of numba threads (the kernels' parallel shares)."""
    return numba.get_num_threads()


def as_kernel_args(kernel):
    """(width, table float64, inv_step) of a :class:`~prime_plugin.core.gridding.GriddingKernel`."""
    table, step = kernel.table()
    return int(kernel.width), np.ascontiguousarray(table), 1.0 / step


@njit(parallel=True, cache=True, fastmath=True)
def sample_planes(F2, kx, ky, scale, width, table, inv_step, out):
    """out[i, j] = F2[i] at scale * (kx_j, ky_j), for half 2D grids F2 (n, M, M // 2 + 1).

    F2 is numpy's ``rfft2`` layout of real padded images (index [y, x], y in FFT
    order); points (m,) in unpadded image Fourier pixels; out complex64 (n, m).
    Normalised kernel weights, as :func:`sample_sections`.
    """
    n = F2.shape[0]
    M = F2.shape[1]
    m = kx.shape[0]
    half_w = 0.5 * width
    for i in prange(n):
        wx = np.empty(width)
        wy = np.empty(width)
        for j in range(m):
            px = kx[j] * scale
            py = ky[j] * scale
            x0 = int(np.floor(px - half_w)) + 1
            y0 = int(np.floor(py - half_w)) + 1
            norm = 1.0 / (axis_weights(x0 - px, width, table, inv_step, wx)
                          * axis_weights(y0 - py, width, table, inv_step, wy))
            re = 0.0
            im = 0.0
            for ty in range(width):
                gy = y0 + ty
                for tx in range(width):
                    gx = _fold_x(x0 + tx, M)
                    w = wy[ty] * wx[tx]
                    if gx >= 0:
                        value = F2[i, wrap_index(gy, M), gx]
                        re += w * value.real
                        im += w * value.imag
                    else:
                        value = F2[i, wrap_index(-gy, M), -gx]
                        re += w * value.real
                        im -= w * value.imag
            out[i, j] = complex(re * norm, im * norm)
