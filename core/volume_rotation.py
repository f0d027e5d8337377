"""Whole maps rotated, symmetrised and re-centred (the last steps of a symmetry alignment).

Maps are ``v[z, y, x]`` with a cubic box N and the centre at N // 2; rotations act on (x, y, z)
coordinates from the centre, as RELION's matrices and the point-group operators of
:mod:`.symmetry` do. ``rotate_volume(v, R)`` is ``out(r) = v(R^T r)``: a feature at p moves to R p.
"""

import numpy as np
import scipy.fft
import scipy.ndimage

from prime_plugin.core.fourier import fft_workers
from prime_plugin.core.symmetry import symmetry_operators

__all__ = ["rotate_volume", "symmetrise_volume", "recentring_shift", "shifted_volume", "sphere_correlation"]


def _index_matrix(rotation):
    """The (z, y, x) index-space form of a rotation acting on (x, y, z): J R J with J the axis reversal."""
    return np.asarray(rotation, np.float64)[::-1, ::-1]


def rotate_volume(volume, rotation, prefiltered=False):
    """The map rotated about its centre: ``out(r) = volume(R^T r)``, float32 (N, N, N).

    volume : (N, N, N), [z, y, x], centre N // 2; rotation : (3, 3) R acting on (x, y, z).
    Cubic B-spline interpolation (``prefiltered``: ``volume`` holds the spline coefficients
    already, scipy.ndimage.spline_filter's); voxels whose source falls outside the box are 0.
    """
    volume = np.asarray(volume)
    matrix = _index_matrix(np.asarray(rotation, np.float64).T)
    centre = np.full(3, volume.shape[0] // 2, np.float64)
    out = scipy.ndimage.affine_transform(volume.astype(np.float64, copy=False), matrix, offset=centre - matrix @ centre,
                                         order=3, mode="constant", cval=0.0, prefilter=not prefiltered)
    return out.astype(np.float32)


def symmetrise_volume(volume, symmetry, rotation=None):
    """The average over G of a map first rotated by R: ``mean_g volume(R^T g r)``, float32 (N, N, N).

    With ``rotation`` None (identity) this is RELION's symmetrisation of a map already in the
    standard orientation (relion_image_handler --sym). Cubic B-spline interpolation.
    """
    R = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
    coefficients = scipy.ndimage.spline_filter(np.asarray(volume, np.float64), order=3, mode="constant")
    total = np.zeros(volume.shape, np.float64)
    for g in symmetry_operators(symmetry):
        total += rotate_volume(coefficients, g @ R, prefiltered=True)  # (g R)^T r = R^T g^T r; G holds g^T too
    return (total / len(symmetry_operators(symmetry))).astype(np.float32)


def recentring_shift(volume):
    """(z, y, x) voxels that move the centre of mass of the positive density to the box centre."""
    positive = np.clip(volume.astype(np.float64), 0.0, None)
    centre = volume.shape[0] // 2
    if not positive.any():
        return np.zeros(3)
    return centre - np.array(scipy.ndimage.center_of_mass(positive))


def shifted_volume(volume, shift_zyx):
    """The map moved by ``shift_zyx`` voxels (Fourier phase ramp: sub-voxel, periodic)."""
    spectrum = scipy.fft.fftn(volume.astype(np.float64), workers=fft_workers())
    return scipy.fft.ifftn(scipy.ndimage.fourier_shift(spectrum, shift_zyx), workers=fft_workers()).real


def sphere_correlation(a, b):
    """Pearson correlation of two (N, N, N) maps inside the box's inscribed sphere."""
    n = a.shape[0]
    c = np.arange(n) - n // 2
    inside = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2 <= (n // 2 - 1) ** 2
    return float(np.corrcoef(a[inside].astype(np.float64), b[inside].astype(np.float64))[0, 1])
