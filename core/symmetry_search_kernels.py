"""Numba kernel of the symmetry search: a map's correlation with many rotated copies of itself.

Public wrapper: :func:`symmetry_search.SelfRotation.correlations`.
"""

import numpy as np
from numba import njit, prange

__all__ = ["rotated_correlations"]


@njit(parallel=True, cache=True)
def rotated_correlations(fine_map, points, reference, rotations, scale, centre, out):
    """out[q] = Pearson correlation of ``reference`` with the map sampled at ``rotations[q] @ points``.

    fine_map : float32 (M, M, M), [z, y, x]; the map, sampled ``scale`` times finer than ``points``'s unit.
    points : float64 (P, 3), (x, y, z) in working voxels from the centre.
    reference : float64 (P,), the map at ``points`` minus its mean, divided by its norm.
    rotations : float64 (Q, 3, 3), acting on (x, y, z) column vectors.
    scale : float, fine voxels per working voxel; centre : float, index of the fine map's centre.
    out : float64 (Q,), written.

    Trilinear interpolation; a sample outside the fine map counts as 0. Because ``reference``
    has zero mean, sum(reference * b) is already the covariance's numerator, so one pass gives it
    with sum(b) and sum(b^2) for b's own variance.
    """
    M = fine_map.shape[0]
    P = points.shape[0]
    for q in prange(rotations.shape[0]):
        R = rotations[q]
        s_ab = 0.0
        s_b = 0.0
        s_bb = 0.0
        for p in range(P):
            x = points[p, 0]
            y = points[p, 1]
            z = points[p, 2]
            fx = (R[0, 0] * x + R[0, 1] * y + R[0, 2] * z) * scale + centre
            fy = (R[1, 0] * x + R[1, 1] * y + R[1, 2] * z) * scale + centre
            fz = (R[2, 0] * x + R[2, 1] * y + R[2, 2] * z) * scale + centre
            ix = int(np.floor(fx))
            iy = int(np.floor(fy))
            iz = int(np.floor(fz))
            b = 0.0
            if ix >= 0 and iy >= 0 and iz >= 0 and ix < M - 1 and iy < M - 1 and iz < M - 1:
                tx = fx - ix
                ty = fy - iy
                tz = fz - iz
                c00 = fine_map[iz, iy, ix] * (1.0 - tx) + fine_map[iz, iy, ix + 1] * tx
                c01 = fine_map[iz, iy + 1, ix] * (1.0 - tx) + fine_map[iz, iy + 1, ix + 1] * tx
                c10 = fine_map[iz + 1, iy, ix] * (1.0 - tx) + fine_map[iz + 1, iy, ix + 1] * tx
                c11 = fine_map[iz + 1, iy + 1, ix] * (1.0 - tx) + fine_map[iz + 1, iy + 1, ix + 1] * tx
                b = (c00 * (1.0 - ty) + c01 * ty) * (1.0 - tz) + (c10 * (1.0 - ty) + c11 * ty) * tz
            s_ab += reference[p] * b
            s_b += b
            s_bb += b * b
        variance = s_bb - s_b * s_b / P
        out[q] = s_ab / np.sqrt(variance) if variance > 0.0 else 0.0
