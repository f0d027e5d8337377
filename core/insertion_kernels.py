"""Numba kernels: insert image Fourier pixels into a half 3D Fourier grid, slab by slab, without races.

The grid is numpy's ``rfftn`` layout of a real padded volume (see
:mod:`fourier_grid_kernels`): ``U[z, y, x]`` complex64 and ``rho[z, y, x]``
float32 of shape (M, M, M // 2 + 1), z and y in FFT order, x from 0 to M / 2.
Each image pixel j of orientation o sits at p = scale * A_o^T (kx_j, ky_j, 0)
(padded-grid units, (x, y, z)) and is spread over the width^3 grid points
around it with the normalised separable kernel w (tabulated: ``table[i]`` =
w(i * step), linear in between):

    U(g)   += w(g - p) / sum(w) * c * value        rho(g) += w(g - p) / sum(w) * c * ctf2

with c = tau_o * column_weight_j; the support is the width integers in
(p - w/2, p + w/2] along each axis. A contribution that falls at negative x
(after folding x into (-M/2, M/2]) is stored at its Friedel mate -g as the
complex conjugate; at x = 0 and x = M/2 it is stored at g and at -g. A point
with px < 0 is first replaced by -p with the conjugate value and the mirrored
support, which gives the same sums (the kernel is even) and puts almost every
point in the fold-free range 0 < x < M/2. (The straightforward kernel, one
point at a time, is kept as the test oracle in tests/reference_insertion.py.)

Parallelism without per-thread grids: the z axis is cut into slabs of
``slab_planes`` planes; a counting sort lists, for every slab, the points that
write into it (directly or through a Friedel mate), ordered by the block of y
rows they start in, so that the insertion sweeps each slab in y and the voxels
it touches stay in cache. Each thread then takes whole slabs (shared out by
their numbers of points, :func:`balance_slabs`) and writes only the voxels of
its slabs: no races, and the result does not depend on the number of threads
beyond float32 rounding.
Positions are computed without fastmath, so the listing pass and the insertion
pass agree to the bit on which planes a point touches.

The public wrapper with checks is :meth:`reconstruct.Backprojector.insert`.
"""

import numpy as np
from numba import njit, prange

from prime_plugin.core.fourier_grid_kernels import axis_weights, wrap_index


@njit(inline="always")
def _mate(index, M):
    """(-index) mod M for index in [0, M)."""
    return 0 if index == 0 else M - index


@njit(inline="always")
def _position(a, u, v):
    """(px, py, pz, flipped): A^T (u, v, 0), negated when px < 0 (then flipped is True)."""
    px = a[0, 0] * u + a[1, 0] * v
    py = a[0, 1] * u + a[1, 1] * v
    pz = a[0, 2] * u + a[1, 2] * v
    if px < 0.0:
        return -px, -py, -pz, True
    return px, py, pz, False


@njit(inline="always")
def _first_index(coordinate, width, flipped):
    """First grid index of a point's support: the width integers in (c - w/2, c + w/2].

    A flipped point (c = -c_original) covers exactly the mirror image of the
    original's support, computed from c_original so that rounding cannot move it.
    """
    if flipped:
        return -(int(np.floor(-coordinate - 0.5 * width)) + 1) - (width - 1)
    return int(np.floor(coordinate - 0.5 * width)) + 1


@njit(inline="always")
def _needs_fold(x0, width, half_m):
    """True unless all x indices x0 .. x0 + width - 1 lie strictly inside (0, M/2)."""
    return x0 < 1 or x0 + width - 1 > half_m - 1


@njit(inline="always")
def _point_slabs(px, pz, flipped, width, M, slab_planes, out):
    """Distinct slabs a point writes into (direct planes, and mate planes when it folds); their number.

    ``out`` int64 (2 * width,) receives the slab numbers.
    """
    x0 = _first_index(px, width, flipped)
    z0 = _first_index(pz, width, flipped)
    fold = _needs_fold(x0, width, M // 2)
    count = 0
    for tz in range(width):
        iz = wrap_index(z0 + tz, M)
        for side in range(2 if fold else 1):
            s = (iz if side == 0 else _mate(iz, M)) // slab_planes
            seen = False
            for q in range(count):
                if out[q] == s:
                    seen = True
            if not seen:
                out[count] = s
                count += 1
    return count


@njit(inline="always")
def _row_block(py, flipped, width, M, rows_per_block):
    """Block of the first y row a point touches (its rows 0 .. M - 1 cut into blocks of rows_per_block)."""
    return wrap_index(_first_index(py, width, flipped), M) // rows_per_block


@njit(parallel=True, cache=True)
def count_slab_points(rotations, kx, ky, scale, width, M, slab_planes, rows_per_block, counts):
    """counts[t, s * B + b] = number of points of share t that write into slab s and start in row block b.

    rotations : float64 (k, 3, 3); kx, ky : float64 (m,) image Fourier pixels; counts : int64
    (T, S * B), zeroed, with S slabs of ``slab_planes`` z planes and B blocks of ``rows_per_block``
    y rows. Share t holds orientations t, t + T, ... Sorting a slab's points by row block
    makes the insertion sweep the slab in y, so that the voxels it touches stay in cache.
    """
    T = counts.shape[0]
    n_blocks = -(-M // rows_per_block)
    k = rotations.shape[0]
    m = kx.shape[0]
    for t in prange(T):
        slabs = np.empty(2 * width, np.int64)
        for o in range(t, k, T):
            a = rotations[o]
            for j in range(m):
                px, py, pz, flipped = _position(a, kx[j] * scale, ky[j] * scale)
                block = _row_block(py, flipped, width, M, rows_per_block)
                n_slabs = _point_slabs(px, pz, flipped, width, M, slab_planes, slabs)
                for q in range(n_slabs):
                    counts[t, slabs[q] * n_blocks + block] += 1


@njit(parallel=True, cache=True)
def list_slab_points(rotations, kx, ky, scale, width, M, slab_planes, rows_per_block, next_free, entries):
    """Write each point's index o * m + j into the lists of the (slab, row block) buckets it belongs to.

    next_free : int64 (T, S * B), where share t's next entry of each bucket goes (from the
    prefix sums of :func:`count_slab_points`); advanced in place. entries : int32 (total,).
    """
    T = next_free.shape[0]
    n_blocks = -(-M // rows_per_block)
    k = rotations.shape[0]
    m = kx.shape[0]
    for t in prange(T):
        slabs = np.empty(2 * width, np.int64)
        for o in range(t, k, T):
            a = rotations[o]
            for j in range(m):
                px, py, pz, flipped = _position(a, kx[j] * scale, ky[j] * scale)
                block = _row_block(py, flipped, width, M, rows_per_block)
                n_slabs = _point_slabs(px, pz, flipped, width, M, slab_planes, slabs)
                for q in range(n_slabs):
                    bucket = slabs[q] * n_blocks + block
                    entries[next_free[t, bucket]] = o * m + j
                    next_free[t, bucket] += 1


@njit(inline="always")
def _add(U_flat, rho_flat, voxel, w, value_re, value_im, weight2):
    """Add w * value to voxel ``voxel`` (flat index) of U (as float32 pairs) and w * weight2 to rho."""
    i = np.uint64(voxel)  # unsigned: no negative-index wraparound test
    U_flat[2 * i] += np.float32(w * value_re)
    U_flat[2 * i + 1] += np.float32(w * value_im)
    rho_flat[i] += np.float32(w * weight2)


@njit(inline="always")
def _insert_point(U_flat, rho_flat, M, z_lo, z_hi, px, py, pz, flipped, value_re, value_im, weight2, width, table,
                  inv_step, wx, wy, wz):
    """Add one point's contributions to the voxels with z_lo <= z < z_hi.

    U_flat : float32 (2 M M (M // 2 + 1),), U's real and imaginary parts; rho_flat : float32
    (M M (M // 2 + 1),); wx, wy, wz : float64 (width,) scratch.
    """
    half_m = M // 2
    n_x = half_m + 1
    x0 = _first_index(px, width, flipped)
    y0 = _first_index(py, width, flipped)
    z0 = _first_index(pz, width, flipped)
    norm = 1.0 / (axis_weights(x0 - px, width, table, inv_step, wx)
                  * axis_weights(y0 - py, width, table, inv_step, wy)
                  * axis_weights(z0 - pz, width, table, inv_step, wz))
    value_re *= norm
    value_im *= norm
    weight2 *= norm
    fold = _needs_fold(x0, width, half_m)
    for tz in range(width):
        iz = wrap_index(z0 + tz, M)
        iz_mate = _mate(iz, M)
        direct = z_lo <= iz < z_hi
        mate = fold and z_lo <= iz_mate < z_hi
        if not (direct or mate):
            continue
        for ty in range(width):
            iy = wrap_index(y0 + ty, M)
            wzy = wz[tz] * wy[ty]
            row = (iz * M + iy) * n_x
            if not fold:  # the common case: x0 .. x0 + width - 1 all inside (0, M/2), no mates
                for tx in range(width):
                    _add(U_flat, rho_flat, row + x0 + tx, wzy * wx[tx], value_re, value_im, weight2)
                continue
            mate_row = (iz_mate * M + _mate(iy, M)) * n_x
            for tx in range(width):
                gx = x0 + tx  # folded into (-M/2, M/2]
                if gx > half_m:
                    gx -= M
                elif gx <= -half_m:
                    gx += M
                w = wzy * wx[tx]
                if direct and gx >= 0:
                    _add(U_flat, rho_flat, row + gx, w, value_re, value_im, weight2)
                if mate and (gx <= 0 or gx == half_m):
                    # The Friedel mate of this contribution lands at -g (in the stored half), conjugated.
                    _add(U_flat, rho_flat, mate_row + (-gx if gx <= 0 else gx), w, value_re, -value_im, weight2)


@njit(parallel=True, cache=True)
def insert_slabs(U, rho, entries, slab_start, slab_planes, slabs_of_thread, thread_start, data, ctf2, image_of,
                 rotations, weights, kx, ky, column_weight, scale, width, table, inv_step):
    """Insert the listed points, each thread writing whole slabs of U and rho.

    U : complex64 (M, M, M // 2 + 1); rho : float32, same shape; updated in place.
    entries : int32, the points o * m + j of slab s in entries[slab_start[s]:slab_start[s + 1]]
    (:func:`list_slab_points`; in row-block order within a slab).
    slabs_of_thread : int64 (S,), the slabs of thread t in slabs_of_thread[thread_start[t]:thread_start[t + 1]]
    (each slab once; :func:`balance_slabs`).
    data : complex64 (n_images, m) values (CTF * X); ctf2 : float32 (n_images, m) density weights.
    image_of : int64 (k,); rotations : float64 (k, 3, 3); weights : float32 (k,) tau per orientation.
    kx, ky : float64 (m,) image Fourier pixels; column_weight : float32 (m,).
    """
    M = U.shape[0]
    U_flat = U.view(np.float32).reshape(-1)
    rho_flat = rho.reshape(-1)
    m = kx.shape[0]
    for t in prange(thread_start.shape[0] - 1):
        wx = np.empty(width)
        wy = np.empty(width)
        wz = np.empty(width)
        for q in range(thread_start[t], thread_start[t + 1]):
            s = slabs_of_thread[q]
            z_lo = s * slab_planes
            z_hi = min(z_lo + slab_planes, M)
            for e in range(slab_start[s], slab_start[s + 1]):
                point = entries[e]
                o = point // m
                j = point - o * m
                px, py, pz, flipped = _position(rotations[o], kx[j] * scale, ky[j] * scale)
                c = weights[o] * column_weight[j]
                value = data[image_of[o], j]
                value_im = -c * value.imag if flipped else c * value.imag
                _insert_point(U_flat, rho_flat, M, z_lo, z_hi, px, py, pz, flipped, c * value.real, value_im,
                              c * ctf2[image_of[o], j], width, table, inv_step, wx, wy, wz)


def balance_slabs(points_per_slab, threads):
    """Share slabs among threads with about equal numbers of points (largest first, each to the least loaded).

    points_per_slab : int (S,). Returns (slabs_of_thread int64 (S,), thread_start int64 (threads + 1,)):
    thread t's slabs are slabs_of_thread[thread_start[t]:thread_start[t + 1]], in increasing order.
    """
    load = np.zeros(threads, np.int64)
    owner = np.empty(len(points_per_slab), np.int64)
    for s in np.argsort(points_per_slab, kind="stable")[::-1]:
        t = int(np.argmin(load))
        owner[s] = t
        load[t] += points_per_slab[s]
    slabs_of_thread = np.argsort(owner, kind="stable").astype(np.int64)
    thread_start = np.searchsorted(owner[slabs_of_thread], np.arange(threads + 1)).astype(np.int64)
    return slabs_of_thread, thread_start
