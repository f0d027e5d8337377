"""Numba kernels: read from and write into a half 3D Fourier grid with a separable kernel.

The grid is numpy's ``rfftn`` layout of a real padded volume: ``F[z, y, x]`` of
shape (M, M, M // 2 + 1), frequencies along z and y in FFT order (index mod M),
x from 0 to M / 2. Values at negative x are the complex conjugates of their
Friedel mates, ``F(-g) = conj F(g)``. Points are given in padded-grid units as
(x, y, z). The kernel is tabulated: ``table[i]`` = w(i * step), linear in between.

Public wrappers with checks live in :mod:`projector` and :mod:`reconstruct`.
"""

import numba
import numpy as np
from numba import njit, prange


@njit(inline="always")
def _kernel_weight(distance, table, inv_step):
    t = abs(distance) * inv_step
    i = int(t)
    frac = t - i
    return table[i] * (1.0 - frac) + table[i + 1] * frac


@njit(inline="always")
def _axis_sum(first_offset, width, table, inv_step):
    """Sum of the kernel weights of one axis' neighbours (normalises interpolation weights)."""
    total = 0.0
    for t in range(width):
        total += _kernel_weight(first_offset + t, table, inv_step)
    return total


@njit(inline="always")
def _fold_x(gx, M):
    """Frequency index gx reduced to the range (-M/2, M/2]."""
    half = M // 2
    return (gx + half - 1) % M - half + 1


@njit(cache=True, fastmath=True)
def _sample_one(F, px, py, pz, width, table, inv_step):
    M = F.shape[0]
    half_w = 0.5 * width
    x0 = int(np.floor(px - half_w)) + 1
    y0 = int(np.floor(py - half_w)) + 1
    z0 = int(np.floor(pz - half_w)) + 1
    norm = 1.0 / (_axis_sum(x0 - px, width, table, inv_step) * _axis_sum(y0 - py, width, table, inv_step)
                  * _axis_sum(z0 - pz, width, table, inv_step))
    re = 0.0
    im = 0.0
    for tz in range(width):
        gz = z0 + tz
        wz = _kernel_weight(gz - pz, table, inv_step)
        for ty in range(width):
            gy = y0 + ty
            wzy = wz * _kernel_weight(gy - py, table, inv_step)
            for tx in range(width):
                gx = _fold_x(x0 + tx, M)
                w = wzy * _kernel_weight(x0 + tx - px, table, inv_step)
                if gx >= 0:
                    value = F[gz % M, gy % M, gx]
                    re += w * value.real
                    im += w * value.imag
                else:
                    value = F[(-gz) % M, (-gy) % M, -gx]
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
        for j in range(m):
            u = kx[j] * scale
            v = ky[j] * scale
            px = a[0, 0] * u + a[1, 0] * v
            py = a[0, 1] * u + a[1, 1] * v
            pz = a[0, 2] * u + a[1, 2] * v
            re, im = _sample_one(F, px, py, pz, width, table, inv_step)
            out[i, j] = complex(re, im)


@njit(cache=True, fastmath=True)
def _insert_one(U, rho, px, py, pz, value_re, value_im, weight2, width, table, inv_step):
    M = U.shape[0]
    half_m = M // 2
    half_w = 0.5 * width
    x0 = int(np.floor(px - half_w)) + 1
    y0 = int(np.floor(py - half_w)) + 1
    z0 = int(np.floor(pz - half_w)) + 1
    norm = 1.0 / (_axis_sum(x0 - px, width, table, inv_step) * _axis_sum(y0 - py, width, table, inv_step)
                  * _axis_sum(z0 - pz, width, table, inv_step))
    value_re *= norm
    value_im *= norm
    weight2 *= norm
    for tz in range(width):
        gz = z0 + tz
        wz = _kernel_weight(gz - pz, table, inv_step)
        for ty in range(width):
            gy = y0 + ty
            wzy = wz * _kernel_weight(gy - py, table, inv_step)
            for tx in range(width):
                gx = _fold_x(x0 + tx, M)
                w = wzy * _kernel_weight(x0 + tx - px, table, inv_step)
                if gx >= 0:
                    iz = gz % M
                    iy = gy % M
                    U[iz, iy, gx] += complex(w * value_re, w * value_im)
                    rho[iz, iy, gx] += w * weight2
                if gx <= 0 or gx == half_m:
                    # The Friedel mate of this contribution lands at -g (in the stored half).
                    iz = (-gz) % M
                    iy = (-gy) % M
                    U[iz, iy, -gx if gx <= 0 else gx] += complex(w * value_re, -w * value_im)
                    rho[iz, iy, -gx if gx <= 0 else gx] += w * weight2


@njit(parallel=True, cache=True, fastmath=True)
def insert_sections(U, rho, data, ctf2, image_of, rotations, weights, kx, ky, column_weight,
                    scale, width, table, inv_step):
    """Add weighted Fourier pixels of images into per-thread sums U[t], rho[t].

    U : complex64 (T, M, M, M//2+1); rho : float32 same shape; T accumulators, one per thread.
    data : complex64 (n_images, m) image values (CTF * X) at points (kx, ky) (m,) in image pixels.
    ctf2 : float32 (n_images, m), the density weights (CTF^2, or 1 without CTF).
    image_of : int64 (k,) image index of each orientation; rotations (k, 3, 3); weights (k,).
    column_weight : float32 (m,), 1/2 for the self-conjugate kx = 0 column, else 1.
    """
    T = U.shape[0]
    k = rotations.shape[0]
    m = kx.shape[0]
    for t in prange(T):
        for o in range(t, k, T):
            a = rotations[o]
            i = image_of[o]
            tau = weights[o]
            for j in range(m):
                c = tau * column_weight[j]
                u = kx[j] * scale
                v = ky[j] * scale
                px = a[0, 0] * u + a[1, 0] * v
                py = a[0, 1] * u + a[1, 1] * v
                pz = a[0, 2] * u + a[1, 2] * v
                value = data[i, j]
                _insert_one(U[t], rho[t], px, py, pz, c * value.real, c * value.imag,
                            c * ctf2[i, j], width, table, inv_step)


def thread_count():
    """Number of numba threads (per-thread accumulators are allocated for each)."""
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
        for j in range(m):
            px = kx[j] * scale
            py = ky[j] * scale
            x0 = int(np.floor(px - half_w)) + 1
            y0 = int(np.floor(py - half_w)) + 1
            norm = 1.0 / (_axis_sum(x0 - px, width, table, inv_step) * _axis_sum(y0 - py, width, table, inv_step))
            re = 0.0
            im = 0.0
            for ty in range(width):
                gy = y0 + ty
                wy = _kernel_weight(gy - py, table, inv_step)
                for tx in range(width):
                    gx = _fold_x(x0 + tx, M)
                    w = wy * _kernel_weight(x0 + tx - px, table, inv_step)
                    if gx >= 0:
                        value = F2[i, gy % M, gx]
                        re += w * value.real
                        im += w * value.imag
                    else:
                        value = F2[i, (-gy) % M, -gx]
                        re += w * value.real
                        im -= w * value.imag
            out[i, j] = complex(re * norm, im * norm)
