"""Euler angles and rotation matrices in RELION's convention.

RELION (and Xmipp, from which it inherits) uses ZYZ Euler angles (rot, tilt, psi)
in degrees and the matrix ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with

    Rz(a) = [[cos a,  sin a, 0], [-sin a, cos a, 0], [0, 0, 1]]
    Ry(b) = [[cos b, 0, -sin b], [0, 1, 0], [sin b, 0, cos b]]

``A`` takes reference (map) coordinates into image coordinates: a projection at
(rot, tilt, psi) is ``img(x, y) = sum_z v(A.T @ (x, y, z))``, and its Fourier
transform is the central section ``F_vol(A.T @ (kx, ky, 0))``. The projection
direction in map coordinates is the third row of ``A``:
``(cos rot sin tilt, sin rot sin tilt, cos tilt)``.

Shapes: angles are scalars or arrays of shape (n,); matrices are (3, 3) or (n, 3, 3).
"""

import numpy as np

# Why the arguments of numpy's trigonometric functions are made contiguous here: numpy
# 1.26 (Scipion's pinned version; 2.4 does not) computes them with SIMD code
# (Intel SVML on AVX-512 machines) unless the input's memory range, taken as stride *
# length, may overlap the output; it then falls back to the C library, whose result can
# differ in the last bit. For a strided view such as R[..., 2, 2] that range runs past
# the end of the array's buffer, so the fallback was taken whenever the heap happened to
# put the new output right behind the matrices: angles that differed in the last bit
# from one run to the next. A contiguous input never overlaps a freshly allocated output.


def _contiguous_entries(a, *entries):
    """Contiguous copies of a[..., *e] for each index tuple e in ``entries`` (over a's last axes)."""
    return tuple(a[(Ellipsis, *e)].copy() for e in entries)  # copy(): C order, and 0-d stays 0-d


# Below this |sin(tilt)| the rotation is treated as one about z (gimbal lock).
# RELION uses 16 * FLT_EPSILON (~1.9e-6) in single or double precision; we use a
# float64-sized threshold so the returned angles reproduce R to ~1e-12 everywhere.
_GIMBAL_SIN_TILT = 1e-12

__all__ = ["euler_to_matrix", "matrix_to_euler", "projection_direction", "direction_to_angles", "rotation_angles_deg",
           "projection_transform_from_pose", "pose_from_projection_transform"]


def euler_to_matrix(rot, tilt, psi):
    """RELION's rotation matrix for Euler angles (RELION's ``Euler_angles2matrix``).

    Parameters
    ----------
    rot, tilt, psi : float or array_like, shape (n,)
        Euler angles in degrees (ZYZ), broadcast against each other.

    Returns
    -------
    ndarray, float64, shape (3, 3) for scalar input, else (n, 3, 3)
        ``A = Rz(psi) Ry(tilt) Rz(rot)``, mapping reference coordinates (x, y, z)
        to image coordinates.
    """
    rot, tilt, psi = np.broadcast_arrays(
        *(np.radians(np.asarray(a, dtype=np.float64)) for a in (rot, tilt, psi))
    )
    ca, sa = np.cos(rot), np.sin(rot)
    cb, sb = np.cos(tilt), np.sin(tilt)
    cg, sg = np.cos(psi), np.sin(psi)

    A = np.empty(rot.shape + (3, 3), dtype=np.float64)
    # Row k of Ry(tilt) Rz(rot), then the psi rotation mixes rows 0 and 1.
    row0 = (cb * ca, cb * sa, -sb)
    row1 = (-sa, ca, np.zeros_like(ca))
    for j in range(3):
        A[..., 0, j] = cg * row0[j] + sg * row1[j]
        A[..., 1, j] = -sg * row0[j] + cg * row1[j]
    A[..., 2, 0] = sb * ca
    A[..., 2, 1] = sb * sa
    A[..., 2, 2] = cb
    return A


def matrix_to_euler(R):
    """Euler angles of rotation matrices (RELION's ``Euler_matrix2angles``).

    Parameters
    ----------
    R : array_like, shape (3, 3) or (n, 3, 3)
        Proper rotation matrices in RELION's convention (see module docstring).

    Returns
    -------
    rot, tilt, psi : float or ndarray of shape (n,), degrees
        ``tilt`` in [0, 180]; ``rot`` and ``psi`` in (-180, 180]. As in RELION,
        when sin(tilt) vanishes (gimbal lock: tilt 0 or 180) the rotation is a
        rotation about z, reported as rot = 0, tilt = 0 or 180 and psi carrying
        the whole in-plane angle, so that ``euler_to_matrix(rot, tilt, psi) == R``.

    Notes
    -----
    RELION takes rot from ``atan2(R[2,1], R[2,0])``, which loses accuracy when
    tilt is tiny (rounding in R becomes an O(eps / sin tilt) error in the angle).
    Here rot is instead read off ``Ry(tilt).T @ Rz(psi).T @ R == Rz(rot)``, which
    gives the same angles for well-conditioned matrices and stays exact near the
    poles: an error in psi is then compensated by rot.
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"expected rotation matrices of shape (3, 3) or (n, 3, 3), got {R.shape}")
    r02, r12, r22, r00, r10 = _contiguous_entries(R, (0, 2), (1, 2), (2, 2), (0, 0), (1, 0))
    abs_sb = np.hypot(r02, r12)
    locked = abs_sb <= _GIMBAL_SIN_TILT
    flipped = r22 < 0  # tilt near 180 when locked

    tilt = np.where(locked, np.where(flipped, np.pi, 0.0), np.arctan2(abs_sb, r22))
    psi_free = np.arctan2(r12, -r02)
    # Locked: R = Rz(psi) Ry(0 or pi), psi read from the upper-left 2x2 block.
    psi_up = np.arctan2(-r10, r00)
    psi_down = np.arctan2(r10, -r00)
    psi = np.where(locked, np.where(flipped, psi_down, psi_up), psi_free)

    # M = Ry(tilt).T Rz(psi).T R is Rz(rot); its first row is (cos rot, sin rot, 0).
    cg, sg = np.cos(psi), np.sin(psi)
    cb, sb = np.cos(tilt), np.sin(tilt)
    row0_of_rz_t_r = (cg[..., None] * R[..., 0, :] - sg[..., None] * R[..., 1, :])
    m0 = cb[..., None] * row0_of_rz_t_r + sb[..., None] * R[..., 2, :]
    m01, m00 = _contiguous_entries(m0, (1,), (0,))
    rot = np.where(locked, 0.0, np.arctan2(m01, m00))

    out = tuple(np.degrees(a) for a in (rot, tilt, psi))
    if R.ndim == 2:
        return tuple(float(a) for a in out)
    return out


def rotation_angles_deg(a, b, operators=None):
    """The angle (deg) of the rotation taking each b onto each a, (n,): a, b float (n, 3, 3) RELION matrices.

    With point-group ``operators`` (s, 3, 3) the smallest angle over b's symmetry mates b @ R (the
    same projection of a symmetric map): the angular error of an orientation found for a symmetric
    particle.
    """
    a = np.asarray(a, np.float64).reshape(-1, 3, 3)
    b = np.asarray(b, np.float64).reshape(-1, 3, 3)
    if operators is None:
        traces = np.einsum("nij,nij->n", a, b)  # trace(a b^T)
    else:
        traces = np.einsum("nij,sjk,nik->ns", a, np.asarray(operators, np.float64), b).max(axis=1)
    return np.degrees(np.arccos(np.clip((traces - 1.0) / 2.0, -1.0, 1.0)))


def projection_direction(rot, tilt):
    """Unit projection direction(s) in map coordinates (third row of the matrix).

    Parameters
    ----------
    rot, tilt : float or array_like, shape (n,)
        Degrees.

    Returns
    -------
    ndarray, float64, shape (3,) or (n, 3)
        ``(cos rot sin tilt, sin rot sin tilt, cos tilt)`` as (x, y, z).
    """
    rot, tilt = np.broadcast_arrays(np.radians(np.asarray(rot, dtype=np.float64)),
                                    np.radians(np.asarray(tilt, dtype=np.float64)))
    return np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], axis=-1)


def direction_to_angles(d):
    """(rot, tilt) in degrees of unit direction(s) ``d`` of shape (3,) or (n, 3).

    tilt = arccos(z) in [0, 180], rot = atan2(y, x) in (-180, 180]; the inverse of
    :func:`projection_direction` (rot is arbitrary, here 0, on the poles).
    """
    d = np.asarray(d, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    x, y, z = _contiguous_entries(d, (0,), (1,), (2,))
    tilt = np.degrees(np.arccos(np.clip(z, -1.0, 1.0)))
    rot = np.degrees(np.arctan2(y, x))
    return rot, tilt


def projection_transform_from_pose(rot, tilt, psi, origin_px):
    """Scipion's 4x4 projection-alignment matrix of RELION poses.

    Scipion stores a particle's 3D projection alignment as ``T = inverse(M)`` with
    ``M = [[A, -s], [0, 1]]``, ``A`` RELION's matrix of (rot, tilt, psi) and ``s`` the
    RELION origin in pixels, so ``T = [[A.T, A.T @ s], [0, 1]]`` (the mapping of
    scipion-em-relion's convert31, checked against its test vector in the tests).

    Parameters
    ----------
    rot, tilt, psi : array_like, shape (n,)
        Degrees.
    origin_px : array_like, shape (n, 2) or (n, 3)
        ``(rlnOriginXAngst, rlnOriginYAngst[, rlnOriginZAngst]) / pixel size``, pixels.

    Returns
    -------
    ndarray, float64, shape (n, 4, 4)
    """
    A = np.atleast_3d(euler_to_matrix(rot, tilt, psi)).reshape(-1, 3, 3)
    origin = np.atleast_2d(np.asarray(origin_px, dtype=np.float64))
    s = np.zeros((len(A), 3))
    s[:, :origin.shape[1]] = origin
    T = np.zeros((len(A), 4, 4))
    T[:, :3, :3] = np.transpose(A, (0, 2, 1))
    T[:, :3, 3] = np.einsum("nji,nj->ni", A, s)
    T[:, 3, 3] = 1.0
    return T


def pose_from_projection_transform(T):
    """RELION poses of Scipion projection-alignment matrices (inverse of the above).

    Parameters
    ----------
    T : array_like, shape (n, 4, 4)

    Returns
    -------
    rot, tilt, psi : ndarray, shape (n,), degrees (RELION's ranges, see matrix_to_euler)
    origin_px : ndarray, shape (n, 3), pixels (multiply by the pixel size for rlnOrigin*Angst)
    """
    M = np.linalg.inv(np.asarray(T, dtype=np.float64).reshape(-1, 4, 4))
    rot, tilt, psi = matrix_to_euler(M[:, :3, :3])
    return np.atleast_1d(rot), np.atleast_1d(tilt), np.atleast_1d(psi), -M[:, :3, 3]
