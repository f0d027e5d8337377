"""Fourier projector: central sections of a padded 3D Fourier transform.

A volume ``v[z, y, x]`` (box N, centre at N // 2) is divided by the gridding
correction, padded to M = padding * N, and transformed once (``rfftn`` half
grid). Central sections are then sampled at any 2D Fourier points with the
interpolation kernel: the Cartesian rfft grid of an image (for projections), or
polar grids (for the search). RELION's convention: the image Fourier transform at
(kx, ky) is the volume's at A^T (kx, ky, 0), A = euler_to_matrix(rot, tilt, psi).

Image origins follow RELION: a particle with origin (ox, oy) px sits at
(N//2 - ox, N//2 - oy); projections are shifted by -origin to match it.
"""

import numpy as np
import scipy.fft

from prime_plugin.core.fourier import fft_workers
from prime_plugin.core.fourier_grid_kernels import as_kernel_args, sample_sections
from prime_plugin.core.gridding import GriddingKernel, correction_3d


def image_half_plane(box, max_radius_px=None):
    """The rfft-layout pixels of a box x box image within the resolution limit.

    Returns
    -------
    kx, ky : float32 (m,)
        Fourier pixel coordinates (cycles per box), kx >= 0, ky signed.
    flat_index : int64 (m,)
        Index into the flattened rfft2 array of shape (box, box // 2 + 1).
    column_weight : float32 (m,)
        1/2 on the self-conjugate kx = 0 column, else 1 (each Friedel pair once).

    Pixels with radius < ``max_radius_px`` (default box / 2, Nyquist) are kept.
    """
    limit = box / 2.0 if max_radius_px is None else float(max_radius_px)
    ky_all = np.fft.fftfreq(box, 1.0 / box)
    kx_all = np.arange(box // 2 + 1)
    KY, KX = np.meshgrid(ky_all, kx_all, indexing="ij")
    keep = (KX * KX + KY * KY) < limit * limit
    flat = np.flatnonzero(keep)
    kx = KX.ravel()[flat].astype(np.float32)
    ky = KY.ravel()[flat].astype(np.float32)
    column_weight = np.where(kx == 0, 0.5, 1.0).astype(np.float32)
    return kx, ky, flat.astype(np.int64), column_weight


def shift_phases(kx, ky, shifts_px, box):
    """exp(-2 pi i (kx sx + ky sy) / box): multiplying a transform by it shifts the image by +s.

    kx, ky : (m,) Fourier pixels; shifts_px : (n, 2) as (x, y) pixels. Returns complex64 (n, m).
    """
    s = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    phase = -2.0 * np.pi / box * (np.outer(s[:, 0], kx) + np.outer(s[:, 1], ky))
    return np.exp(1j * phase).astype(np.complex64)


def volume_half_transform(volume, padding):
    """rfftn of the volume padded to padding * box with its centre moved to index 0, complex64."""
    box = volume.shape[0]
    padded_box = int(round(padding * box))
    padded = np.zeros((padded_box,) * 3, dtype=np.float32)
    start = padded_box // 2 - box // 2
    padded[start:start + box, start:start + box, start:start + box] = volume
    return scipy.fft.rfftn(np.fft.ifftshift(padded), workers=fft_workers()).astype(np.complex64)


class FourierProjector:
    """Central sections of one volume.

    Parameters
    ----------
    volume : ndarray (N, N, N), [z, y, x]
    padding : float
        Padding factor of the Fourier grid (2 by default).
    kernel : GriddingKernel
        Interpolation kernel (Kaiser-Bessel width 3 by default).
    """

    def __init__(self, volume, padding=2.0, kernel=None):
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(f"FourierProjector needs a cubic volume, got shape {volume.shape}")
        self.box = volume.shape[0]
        self.padding = float(padding)
        self.kernel = kernel or GriddingKernel()
        corrected = volume / correction_3d(self.kernel, self.box, self.padding, normalise=True)
        self.transform = volume_half_transform(corrected, self.padding)
        self.padded_box = self.transform.shape[0]
        self._kernel_args = as_kernel_args(self.kernel)

    def sample(self, rotations, kx, ky):
        """Central-section values at 2D Fourier points for each rotation.

        rotations : (n, 3, 3) RELION matrices; kx, ky : (m,) points in image Fourier
        pixels (cycles per box, may be fractional). Returns complex64 (n, m).
        """
        rotations = np.ascontiguousarray(np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3))
        kx = np.ascontiguousarray(kx, dtype=np.float64).ravel()
        ky = np.ascontiguousarray(ky, dtype=np.float64).ravel()
        out = np.empty((len(rotations), len(kx)), dtype=np.complex64)
        width, table, inv_step = self._kernel_args
        scale = self.padded_box / self.box
        sample_sections(self.transform, rotations, kx, ky, scale, width, table, inv_step, out)
        return out

    def project_fourier(self, rotations, shifts_px=None, ctf=None, max_radius_px=None):
        """Projections in the rfft2 layout (image centre at pixel 0), complex64 (n, N, N // 2 + 1).

        shifts_px : (n, 2) RELION origins (x, y) in pixels, or None.
        ctf : float32 (n, N, N // 2 + 1) in the rfft layout (:func:`ctf.ctf_image` with rfft=True), or None.
        """
        rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
        kx, ky, flat, _ = image_half_plane(self.box, max_radius_px)
        values = self.sample(rotations, kx, ky)
        if shifts_px is not None:
            values *= shift_phases(kx, ky, -np.asarray(shifts_px, dtype=np.float64), self.box)
        out = np.zeros((len(rotations), self.box * (self.box // 2 + 1)), dtype=np.complex64)
        out[:, flat] = values
        out = out.reshape(len(rotations), self.box, self.box // 2 + 1)
        if ctf is not None:
            out *= ctf
        return out

    def project(self, rotations, shifts_px=None, ctf=None, max_radius_px=None):
        """Real-space projections, float32 (n, N, N), image centre at pixel N // 2."""
        half = self.project_fourier(rotations, shifts_px, ctf, max_radius_px)
        images = scipy.fft.irfft2(half, s=(self.box, self.box), workers=fft_workers())
        return np.fft.fftshift(images, axes=(-2, -1)).astype(np.float32)
