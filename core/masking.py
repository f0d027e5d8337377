"""Solvent masks from a map, as relion_mask_create (RELION 3.1) makes them.

A mask is 1 on the particle, 0 in the solvent, with a soft edge between, and is
applied by multiplication. The steps and their meaning follow relion_mask_create
(src/mask.cpp, checked against the program in tests/test_masking.py):

1. optionally low-pass filter the map (``lowpass_A``, RELION's --lowpass: the cut-off
   on the nearest whole Fourier shell with a raised cosine two shells wide,
   ``fourier.shell_low_pass``);
2. binarise: 1 where the map is >= ``threshold`` (--ini_threshold);
3. extend the binary mask by ``extend_px`` (--extend_inimask): every voxel closer
   than ``extend_px`` (Euclidean distance between voxel centres, strictly less) to a
   voxel of the mask joins it; a negative value shrinks it the same way;
4. add a soft edge ``soft_edge_px`` wide (--width_soft_edge) outside it: a voxel at
   distance d < ``soft_edge_px`` from the mask gets 0.5 + 0.5 cos(pi d / soft_edge_px),
   the voxels farther away 0.

RELION measures those distances by scanning a cube of neighbours around each voxel;
here one Euclidean distance transform (scipy.ndimage) gives the same distances.
"""

from typing import Optional

import numpy as np
import scipy.ndimage

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import shell_low_pass

__all__ = ["solvent_mask"]


def _distance_to(region):
    """Euclidean distance (voxels) of every voxel to the nearest voxel of ``region`` (0 inside it)."""
    return scipy.ndimage.distance_transform_edt(~region)


def solvent_mask(volume: np.ndarray, pixel_size_A: float, threshold: float, extend_px: float = 0.0,
                 soft_edge_px: float = 0.0, lowpass_A: Optional[float] = None) -> np.ndarray:
    """A soft solvent mask of ``volume``: relion_mask_create's threshold, extension and soft edge.

    Parameters
    ----------
    volume : ndarray, real, shape (N, N, N), order [z, y, x]
        The map to threshold (density units, whatever the map's scale).
    pixel_size_A : float
        Voxel size in Angstrom; only used by the low-pass filter.
    threshold : float
        Density at or above which a voxel belongs to the initial binary mask.
    extend_px : float
        Grow the binary mask by this many voxels (negative: shrink it).
    soft_edge_px : float >= 0
        Width in voxels of the raised-cosine edge added outside the extended mask.
    lowpass_A : float or None
        Low-pass filter the map at this resolution (Angstrom) before thresholding; None: no filter.

    Returns
    -------
    ndarray, float32, shape (N, N, N), values in [0, 1]

    Raises
    ------
    PrimeInputError
        A volume that is not a finite cubic 3D map, no voxel at or above the threshold,
        a negative soft edge, a non-positive pixel size or low-pass resolution.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1 or not np.isrealobj(volume):
        raise PrimeInputError(f"expected a real cubic 3D map (z, y, x), got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise PrimeInputError("the map holds NaN or infinite voxels")
    for name, value in (("threshold", threshold), ("extend_px", extend_px), ("soft_edge_px", soft_edge_px)):
        if not np.isfinite(value):
            raise PrimeInputError(f"{name} must be a finite number, got {value!r}", parameter=name)
    if soft_edge_px < 0:
        raise PrimeInputError(f"soft_edge_px must be >= 0 voxels, got {soft_edge_px:g}", parameter="soft_edge_px")
    if lowpass_A is not None:
        if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise PrimeInputError(f"pixel_size_A must be a positive number of Angstrom to low-pass filter, "
                                  f"got {pixel_size_A!r}", parameter="pixel_size_A")
        if not (np.isfinite(lowpass_A) and lowpass_A > 0):
            raise PrimeInputError(f"lowpass_A must be a positive resolution in Angstrom, got {lowpass_A!r}",
                                  parameter="lowpass_A")
        volume = shell_low_pass(volume, lowpass_A, pixel_size_A)
    inside = volume >= threshold
    if not inside.any():
        raise PrimeInputError(f"no voxel of the map reaches threshold {threshold:g} (the map's maximum is "
                              f"{float(volume.max()):g})", parameter="threshold")
    if extend_px > 0:
        inside |= _distance_to(inside) < extend_px
    elif extend_px < 0:
        inside &= ~(_distance_to(~inside) < -extend_px)
        if not inside.any():
            raise PrimeInputError(f"shrinking by {-extend_px:g} voxels leaves an empty mask", parameter="extend_px")
    mask = inside.astype(np.float32)
    if soft_edge_px > 0:
        distance = _distance_to(inside)
        edge = ~inside & (distance < soft_edge_px)
        mask[edge] = 0.5 + 0.5 * np.cos(np.pi * distance[edge] / soft_edge_px)
    return mask
