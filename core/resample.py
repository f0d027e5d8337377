"""Resample a map to another pixel size (Fourier cropping or padding) and box.

The map is read as samples of a band-limited function: its Fourier series is cut
(pixel size up) or extended with zeros (pixel size down) and evaluated on the new
grid, one axis at a time (the cube window is separable). Values are kept (a
constant map stays the same constant; density per voxel, not per unit volume),
the centre stays at index box // 2 for odd and even boxes, and the result is
exact for maps whose spectrum is zero at and beyond the smaller of the two
Nyquist frequencies. An even box's Nyquist term is split evenly between +N/2
and -N/2 (trigonometric interpolation), so resampling to the same grid is the
identity. The box is then cropped or zero-padded in real space around the centre.
"""

import numpy as np
import scipy.fft

from prime_plugin.core.errors import PrimeInputError

__all__ = ["resample_volume", "fourier_resampled_box", "crop_or_pad"]


def fourier_resampled_box(box, pixel_size_A, new_pixel_size_A):
    """Box after changing the pixel size: round(box * pixel_size_A / new_pixel_size_A), at least 1."""
    return max(int(round(box * float(pixel_size_A) / float(new_pixel_size_A))), 1)


def _resample_last_axis(array, new_length):
    """Fourier-resample ``array`` along its last axis from length n to ``new_length`` (centre at length // 2)."""
    n = array.shape[-1]
    spectrum = scipy.fft.fft(np.fft.ifftshift(array, axes=-1), axis=-1, workers=-1)
    k_max = min(n // 2, new_length // 2)
    k = np.arange(-k_max, k_max + 1)
    weight = np.ones(len(k))
    if n % 2 == 0 and k_max == n // 2:
        weight[[0, -1]] = 0.5  # an even n's Nyquist term, shared by +n/2 and -n/2
    resampled = np.zeros(array.shape[:-1] + (new_length,), dtype=spectrum.dtype)
    # Two passes: within each, the target indices k mod new_length are distinct
    # (only +-new_length/2 can meet, and they must add up).
    for part in (k >= 0, k < 0):
        resampled[..., k[part] % new_length] += spectrum[..., k[part] % n] * weight[part]
    real = scipy.fft.ifft(resampled, axis=-1, workers=-1).real * (new_length / n)
    return np.fft.fftshift(real, axes=-1)


def crop_or_pad(volume, new_box):
    """Real-space crop or zero-pad of a cubic ``volume`` (z, y, x) to ``new_box``, centre at box // 2 kept."""
    box = volume.shape[0]
    out = np.zeros((new_box,) * 3, dtype=volume.dtype)
    # Old index i lands at i - box // 2 + new_box // 2.
    offset = new_box // 2 - box // 2
    src = slice(max(0, -offset), min(box, new_box - offset))
    dst = slice(src.start + offset, src.stop + offset)
    out[dst, dst, dst] = volume[src, src, src]
    return out


def resample_volume(volume, pixel_size_A, new_pixel_size_A=None, new_box=None):
    """Change a map's pixel size by Fourier cropping/padding, then its box by real-space crop/pad.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), order [z, y, x], float
        Cubic map, centre at index N // 2.
    pixel_size_A : float
        Its voxel size in Angstrom (> 0).
    new_pixel_size_A : float, optional
        Wanted voxel size in Angstrom; default: unchanged. The Fourier step gives a
        box of M = round(N * pixel_size_A / new_pixel_size_A) voxels over the same
        physical extent, so the achieved voxel size N * pixel_size_A / M (returned)
        can differ slightly from the one asked for when N * pixel_size_A /
        new_pixel_size_A is not an integer.
    new_box : int, optional
        Final box in voxels after the resampling: the map is cropped or padded
        with zeros around its centre (index M // 2 goes to new_box // 2).
        Default: M.

    Returns
    -------
    volume : ndarray, shape (new_box, new_box, new_box), [z, y, x]
        float32 for float32 input, else float64; values are densities per voxel
        (a constant map stays constant, a Gaussian keeps its width in Angstrom).
    pixel_size_A : float
        The achieved voxel size in Angstrom.

    Raises
    ------
    PrimeInputError
        For a non-cubic map, a non-positive pixel size or box.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise PrimeInputError(f"expected a cubic 3D map, got shape {volume.shape} (z, y, x)")
    dtype = np.float32 if volume.dtype == np.float32 else np.float64
    volume = volume.astype(dtype, copy=False)
    pixel_size_A = float(pixel_size_A)
    if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise PrimeInputError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A!r}")
    box = volume.shape[0]
    fourier_box = box
    if new_pixel_size_A is not None:
        new_pixel_size_A = float(new_pixel_size_A)
        if not (np.isfinite(new_pixel_size_A) and new_pixel_size_A > 0):
            raise PrimeInputError(f"new pixel size must be a positive number of Angstrom, got {new_pixel_size_A!r}")
        fourier_box = fourier_resampled_box(box, pixel_size_A, new_pixel_size_A)
    out = volume
    if fourier_box != box:
        for axis in range(3):
            out = np.moveaxis(_resample_last_axis(np.moveaxis(out, axis, -1), fourier_box), -1, axis)
        out = out.astype(dtype, copy=False)
    achieved_A = box * pixel_size_A / fourier_box
    if new_box is not None:
        if int(new_box) != new_box or int(new_box) < 1:
            raise PrimeInputError(f"box must be a positive whole number of voxels, got {new_box!r}")
        if int(new_box) != fourier_box:
            out = crop_or_pad(out, int(new_box))
    return (out.copy() if out is volume else out), achieved_A
