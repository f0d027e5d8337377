"""Fourier-shell statistics and filters of volumes: shells, FSC, resolution, masks, low-pass.

Volumes are ``v[z, y, x]`` with a cubic box N and the centre at N // 2. Shell k
holds the Fourier voxels whose radius rounds to k pixels (cycles per box); its
spatial frequency is k / (N * pixel size) 1/A. Shells run from 0 to N // 2.
"""

import numba
import numpy as np
import scipy.fft


def fft_workers():
    """Threads for scipy.fft: numba's current thread count, so that one setting (``--j``) governs both."""
    return numba.get_num_threads()


def shell_index(box):
    """Shell number of every voxel of an rfftn half grid, int64 (N, N, N // 2 + 1)."""
    f = np.fft.fftfreq(box, 1.0 / box)
    fx = np.arange(box // 2 + 1)
    radius = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    return np.rint(radius).astype(np.int64)


def _half_weights(box):
    """Multiplicity of each rfftn voxel in the full grid (2, except self-conjugate planes), (N//2+1,)."""
    w = np.full(box // 2 + 1, 2.0)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return w


def fsc(volume1, volume2):
    """Fourier shell correlation of two maps, float64 (N // 2 + 1,), shell k at k / (N apix) 1/A."""
    box = volume1.shape[0]
    f1 = scipy.fft.rfftn(np.asarray(volume1, np.float64), workers=fft_workers())
    f2 = scipy.fft.rfftn(np.asarray(volume2, np.float64), workers=fft_workers())
    shells = shell_index(box)
    weight = np.broadcast_to(_half_weights(box), shells.shape)
    keep = shells <= box // 2
    s = shells[keep]
    w = weight[keep]
    n = box // 2 + 1
    cross = np.bincount(s, weights=w * (f1[keep] * np.conj(f2[keep])).real, minlength=n)
    p1 = np.bincount(s, weights=w * np.abs(f1[keep]) ** 2, minlength=n)
    p2 = np.bincount(s, weights=w * np.abs(f2[keep]) ** 2, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = cross / np.sqrt(p1 * p2)
    return np.nan_to_num(out[:n], nan=0.0)


def shell_frequencies(box, pixel_size_A):
    """Spatial frequency of each shell in 1/A, (N // 2 + 1,)."""
    return np.arange(box // 2 + 1) / (box * pixel_size_A)


def resolution_at(curve, threshold, box, pixel_size_A):
    """Resolution in A where an FSC curve first drops below ``threshold``.

    Linear interpolation between the last shell above and the first below (from
    shell 1); Nyquist (2 * pixel size) when it never drops.
    """
    curve = np.asarray(curve, np.float64)
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        return 2.0 * pixel_size_A
    k = below[0] + 1
    if k == 1:
        shell = 1.0
    else:
        a, b = curve[k - 1], curve[k]
        shell = (k - 1) + (a - threshold) / (a - b)
    return box * pixel_size_A / shell


def soft_sphere_mask(box, radius_px, edge_px=5.0):
    """Spherical mask of ``radius_px`` with a raised-cosine edge ``edge_px`` wide, float32 (N, N, N)."""
    c = np.arange(box) - box // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    mask = np.clip((radius_px + edge_px - r) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * mask)).astype(np.float32)


def low_pass(volume, resolution_A, pixel_size_A, edge_shells=2.0):
    """Volume low-pass filtered at ``resolution_A`` with a raised-cosine edge of a few shells."""
    box = volume.shape[0]
    cutoff = box * pixel_size_A / resolution_A
    f = np.fft.fftfreq(box, 1.0 / box)
    fx = np.arange(box // 2 + 1)
    radius = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    ramp = np.clip((cutoff + edge_shells / 2 - radius) / edge_shells, 0.0, 1.0)
    filt = 0.5 - 0.5 * np.cos(np.pi * ramp)
    spectrum = scipy.fft.rfftn(np.asarray(volume, np.float64), workers=fft_workers()) * filt
    return scipy.fft.irfftn(spectrum, s=volume.shape, workers=fft_workers()).astype(np.float32)


def shell_low_pass(volume, resolution_A, pixel_size_A, edge_shells=2):
    """RELION's low-pass (lowPassFilterMap): :func:`low_pass` with its cut-off on the nearest whole shell.

    The cut-off shell is round(N * pixel size / resolution); the raised cosine falls from
    1 at ``edge_shells / 2`` shells below it to 0 as far above. float32 (N, N, N).
    """
    box = volume.shape[0]
    shell = max(int(np.rint(box * pixel_size_A / resolution_A)), 1)
    return low_pass(volume, box * pixel_size_A / shell, pixel_size_A, edge_shells=edge_shells)
