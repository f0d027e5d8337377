"""Reconstruction by direct Fourier insertion, with the sums kept for incremental updates.

For each half-set two sums live on the padded half Fourier grid (numpy ``rfftn``
layout of the padded volume, shape (M, M, M // 2 + 1)):

    U(g)   = sum_i sum_j tau_ij w(g - p_ij) CTF_i X_i       (complex64)
    rho(g) = sum_i sum_j tau_ij w(g - p_ij) CTF_i^2         (float32)

with p_ij the 3D position of an image pixel at orientation j and w the gridding
kernel. They add, scale (the incremental update blends them) and save. The map
is V = U / (rho + 1 / SSNR) (Wiener-like; SSNR from the FSC), transformed back,
gridding-corrected, optionally masked. Symmetry: every symmetry mate of each
orientation is inserted (A R for each operator R).
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier_grid_kernels import as_kernel_args, insert_sections, thread_count
from prime_plugin.core.gridding import GriddingKernel, correction_3d
from prime_plugin.core.projector import image_half_plane, shift_phases


@dataclass
class FourierSums:
    """The sums U (complex64) and rho (float32) of one half-set, shape (M, M, M // 2 + 1).

    ``box`` is the unpadded box N, ``padding`` = M / N.
    """

    U: np.ndarray
    rho: np.ndarray
    box: int
    padding: float = 2.0

    @classmethod
    def zeros(cls, box, padding=2.0):
        padded = int(round(padding * box))
        shape = (padded, padded, padded // 2 + 1)
        return cls(np.zeros(shape, np.complex64), np.zeros(shape, np.float32), box, padding)

    def __add__(self, other):
        self._check_compatible(other)
        return FourierSums(self.U + other.U, self.rho + other.rho, self.box, self.padding)

    def scaled(self, factor):
        """The sums times ``factor`` (e.g. 1 - update fraction)."""
        return FourierSums(self.U * np.float32(factor), self.rho * np.float32(factor), self.box, self.padding)

    def _check_compatible(self, other):
        if (self.box, self.padding, self.U.shape) != (other.box, other.padding, other.U.shape):
            raise ValueError("Fourier sums of different boxes or paddings cannot be combined")

    def save(self, path):
        """Save to ``path`` (.npz) atomically."""
        path = Path(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent or ".")
        os.close(handle)
        try:
            np.savez(temporary, U=self.U, rho=self.rho, box=self.box, padding=self.padding)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path):
        try:
            with np.load(path) as saved:
                return cls(saved["U"], saved["rho"], int(saved["box"]), float(saved["padding"]))
        except (OSError, KeyError, ValueError) as exc:
            raise PrimeInputError(f"not a saved set of Fourier sums ({exc})", path) from None


class Backprojector:
    """Inserts particle images into :class:`FourierSums`.

    Parameters
    ----------
    box : int
        Image side N in pixels.
    padding : float
    kernel : GriddingKernel
    max_radius_px : float, optional
        Resolution limit in Fourier pixels (default N / 2, Nyquist).
    symmetry_ops : ndarray (s, 3, 3), optional
        Point-group operators; every mate A R is inserted.
    """

    def __init__(self, box, padding=2.0, kernel=None, max_radius_px=None, symmetry_ops=None):
        self.box = int(box)
        self.padding = float(padding)
        self.kernel = kernel or GriddingKernel()
        self.kx, self.ky, self.flat, self.column_weight = image_half_plane(self.box, max_radius_px)
        self.symmetry_ops = None if symmetry_ops is None else np.asarray(symmetry_ops, np.float64)
        self._kernel_args = as_kernel_args(self.kernel)

    def image_transforms(self, images, shifts_px=None, ctf=None):
        """Centred, CTF-weighted Fourier pixels of images and their density weights.

        images : (n, N, N) real, centre at N // 2. shifts_px : (n, 2) RELION origins
        (x, y) px. ctf : (n, N, N // 2 + 1) rfft layout, or None.
        Returns data complex64 (n, m) = CTF * X at the half-plane pixels and
        ctf2 float32 (n, m) = CTF^2 (ones without CTF).
        """
        images = np.asarray(images, dtype=np.float32)
        spectra = scipy.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1)), workers=-1)
        spectra = spectra.reshape(len(images), -1)[:, self.flat].astype(np.complex64)
        if shifts_px is not None:
            spectra *= shift_phases(self.kx, self.ky, shifts_px, self.box)
        if ctf is None:
            return spectra, np.ones(spectra.shape, np.float32)
        ctf_values = np.asarray(ctf, np.float32).reshape(len(images), -1)[:, self.flat]
        return spectra * ctf_values, ctf_values * ctf_values

    def insert(self, sums, data, ctf2, rotations, image_of=None, weights=None):
        """Add ``data`` (n, m) at orientations ``rotations`` (k, 3, 3) into ``sums`` in place.

        image_of : (k,) image row of each orientation (default: one orientation per image).
        weights : (k,) orientation weights tau (default 1).
        """
        threads = thread_count()
        U = np.zeros((threads,) + sums.U.shape, np.complex64)
        rho = np.zeros((threads,) + sums.rho.shape, np.float32)
        self.insert_per_thread(U, rho, data, ctf2, rotations, image_of, weights)
        sums.U += U.sum(axis=0)
        sums.rho += rho.sum(axis=0)

    def insert_per_thread(self, U, rho, data, ctf2, rotations, image_of=None, weights=None):
        """As :meth:`insert`, into per-thread accumulators that the caller sums over axis 0 when done.

        U : complex64 (T, M, M, M // 2 + 1), rho : float32 (same shape), any T >= 1;
        for many batches this saves the allocation and the reduction of every call.
        """
        rotations = np.asarray(rotations, np.float64).reshape(-1, 3, 3)
        k = len(rotations)
        image_of = np.arange(k, dtype=np.int64) if image_of is None else np.asarray(image_of, np.int64)
        weights = np.ones(k, np.float32) if weights is None else np.asarray(weights, np.float32)
        if self.symmetry_ops is not None and len(self.symmetry_ops) > 1:
            s = len(self.symmetry_ops)
            rotations = np.einsum("kij,sjl->ksil", rotations, self.symmetry_ops).reshape(-1, 3, 3)
            image_of = np.repeat(image_of, s)
            weights = np.repeat(weights, s)
        width, table, inv_step = self._kernel_args
        insert_sections(U, rho, np.ascontiguousarray(data, np.complex64), np.ascontiguousarray(ctf2, np.float32),
                        image_of, np.ascontiguousarray(rotations), weights, self.kx.astype(np.float64),
                        self.ky.astype(np.float64), self.column_weight, self.padding, width, table, inv_step)

    def insert_images(self, sums, images, rotations, shifts_px=None, ctf=None, image_of=None, weights=None):
        """Transform real images (n, N, N) and insert them (see :meth:`image_transforms`, :meth:`insert`)."""
        data, ctf2 = self.image_transforms(images, shifts_px, ctf)
        self.insert(sums, data, ctf2, rotations, image_of, weights)


def shell_radii(padded_box, box):
    """Radius of every half-grid voxel in unpadded Fourier pixels, float32 (M, M, M // 2 + 1)."""
    f = np.fft.fftfreq(padded_box, 1.0 / padded_box).astype(np.float32) * (box / padded_box)
    fx = np.arange(padded_box // 2 + 1, dtype=np.float32) * (box / padded_box)
    return np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)


def wiener_regulariser(sums, fsc):
    """Per-voxel 1/SSNR term in rho's units: mean rho of the shell * (1 - FSC) / FSC.

    fsc : (n_shells,) FSC per unpadded Fourier shell (index = radius in pixels), or
    None for a tiny regulariser (1e-3 of the shell's mean rho) that only avoids
    division by empty voxels.
    """
    radii = shell_radii(sums.U.shape[0], sums.box)
    shell = np.rint(radii).astype(np.int64)
    n_shells = shell.max() + 1
    counts = np.bincount(shell.ravel(), minlength=n_shells)
    mean_rho = np.bincount(shell.ravel(), weights=sums.rho.ravel(), minlength=n_shells) / np.maximum(counts, 1)
    if fsc is None:
        inverse_ssnr = np.full(n_shells, 1e-3)
    else:
        f = np.clip(np.asarray(fsc, np.float64), 1e-3, 0.999)
        f = np.concatenate([f, np.full(max(0, n_shells - len(f)), 1e-3)])[:n_shells]
        inverse_ssnr = (1.0 - f) / f
    return (mean_rho * inverse_ssnr).astype(np.float32)[shell]


def reconstruct_volume(sums, fsc=None, kernel=None, max_radius_px=None):
    """The map from Fourier sums: V = U / (rho + 1/SSNR), back to real space, gridding-corrected.

    Returns float32 (N, N, N), [z, y, x], centre at N // 2.
    """
    kernel = kernel or GriddingKernel()
    regulariser = wiener_regulariser(sums, fsc)
    denominator = sums.rho + regulariser
    V = np.where(denominator > 0, sums.U / np.where(denominator > 0, denominator, 1), 0).astype(np.complex64)
    limit = sums.box / 2.0 if max_radius_px is None else max_radius_px
    V[shell_radii(sums.U.shape[0], sums.box) >= limit] = 0
    M = sums.U.shape[0]
    padded = np.fft.fftshift(scipy.fft.irfftn(V, s=(M, M, M), workers=-1))
    start = M // 2 - sums.box // 2
    volume = padded[start:start + sums.box, start:start + sums.box, start:start + sums.box]
    return (volume / correction_3d(kernel, sums.box, sums.padding, normalise=True)).astype(np.float32)


def backproject(sums, kernel=None):
    """Adjoint of :meth:`FourierProjector.project` for images inserted with unit weights.

    Given sums holding insertions of images u (without density division), returns
    the real volume P^T u (float32 (N, N, N)); used to test that projector and
    back-projector are exact adjoints.
    """
    kernel = kernel or GriddingKernel()
    M = sums.U.shape[0]
    N = sums.box
    padded = np.fft.fftshift(scipy.fft.irfftn(sums.U, s=(M, M, M), workers=-1)) * (float(M) ** 3 / float(N) ** 2)
    start = M // 2 - N // 2
    volume = padded[start:start + N, start:start + N, start:start + N]
    return (volume / correction_3d(kernel, N, sums.padding, normalise=True)).astype(np.float32)
