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

from dataclasses import dataclass

import numpy as np
import scipy.fft

from prime_plugin.core.atomic_files import atomic_output
from prime_plugin.core.ctf import CTF_TERMS, CtfParams, ctf_terms
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import fft_workers
from prime_plugin.core.fourier_grid_kernels import as_kernel_args, thread_count
from prime_plugin.core.gridding import GriddingKernel, correction_3d
from prime_plugin.core.image_spectrum_kernels import gather_shift_ctf
from prime_plugin.core.insertion_kernels import balance_slabs, count_slab_points, insert_slabs, list_slab_points
from prime_plugin.core.projector import image_half_plane
from prime_plugin.core.sums_kernels import shell_totals, wiener_divide

SLAB_PLANES = 16  # most z planes per slab of the parallel insertion (each thread writes whole slabs) ...
SLABS_PER_THREAD = 4  # ... but at least this many slabs per thread, to share the work evenly
ROWS_PER_BLOCK = 16  # within a slab, points are inserted in blocks of y rows (the voxels stay in cache)
POINTS_PER_BATCH = 1 << 22  # orientation x pixel points listed at a time (bounds the slab lists: 4 B per entry)


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

    def __sub__(self, other):
        """These sums without ``other``'s contributions (e.g. some particles' previous insertions)."""
        self._check_compatible(other)
        return FourierSums(self.U - other.U, self.rho - other.rho, self.box, self.padding)

    def __iadd__(self, other):
        """Add ``other`` into these sums, in place (the same float32 result as ``+``, no new grids)."""
        self._check_compatible(other)
        np.add(self.U, other.U, out=self.U)
        np.add(self.rho, other.rho, out=self.rho)
        return self

    def grown(self, box):
        """These sums in the padded grid of the larger box ``box`` (the same padding): a padded grid's
        frequency step is 1 / (padding N apix) whatever N (images cropped in Fourier space keep their
        transform, :mod:`~prime_plugin.core.working_box`), so these sums are the centre of the larger
        grid, which is zero around them. Needs sums whose insertions stayed inside their padded Nyquist."""
        if box == self.box:
            return self
        if box < self.box:
            raise ValueError(f"Fourier sums of box {self.box} cannot shrink to {box}")
        grown = FourierSums.zeros(box, self.padding)
        half = self.U.shape[0] // 2
        # rfftn layout: the first two axes hold frequencies 0..half-1 then -half..-1; the last 0..half.
        for rows in (slice(0, half), slice(-half, None)):
            for columns in (slice(0, half), slice(-half, None)):
                grown.U[rows, columns, :half + 1] = self.U[rows, columns]
                grown.rho[rows, columns, :half + 1] = self.rho[rows, columns]
        return grown

    def scaled(self, factor):
        """The sums times ``factor`` (e.g. 1 - update fraction)."""
        return FourierSums(self.U * np.float32(factor), self.rho * np.float32(factor), self.box, self.padding)

    def _check_compatible(self, other):
        if (self.box, self.padding, self.U.shape) != (other.box, other.padding, other.U.shape):
            raise ValueError("Fourier sums of different boxes or paddings cannot be combined")

    def save(self, path):
        """Save to ``path`` (.npz) atomically."""
        with atomic_output(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, U=self.U, rho=self.rho, box=self.box, padding=self.padding)

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

    The insertion threads share one grid: each writes its own z slabs
    (:mod:`~prime_plugin.core.insertion_kernels`), so no per-thread grids are needed.
    """

    def __init__(self, box, padding=2.0, kernel=None, max_radius_px=None, symmetry_ops=None):
        self.box = int(box)
        self.padding = float(padding)
        self.kernel = kernel or GriddingKernel()
        self.kx, self.ky, self.flat, self.column_weight = image_half_plane(self.box, max_radius_px)
        self._kx64 = self.kx.astype(np.float64)
        self._ky64 = self.ky.astype(np.float64)
        self._rows, self._cols = np.divmod(self.flat, self.box // 2 + 1)
        self._row_ky = np.fft.fftfreq(self.box, 1.0 / self.box)
        self.symmetry_ops = None if symmetry_ops is None else np.asarray(symmetry_ops, np.float64)
        self._kernel_args = as_kernel_args(self.kernel)

    def image_transforms(self, images, shifts_px=None, ctf=None, pixel_size_A=None):
        """Centred, shifted, CTF-weighted Fourier pixels of images and their density weights.

        images : (n, N, N) real, centre at N // 2. shifts_px : (n, 2) RELION origins
        (x, y) px, or None. ctf : per-particle :class:`~prime_plugin.core.ctf.CtfParams`
        (n particles; then ``pixel_size_A`` is needed), or float32 (n, N, N // 2 + 1) in the
        rfft layout (:func:`~prime_plugin.core.ctf.ctf_image` with rfft=True), or None.
        Returns data complex64 (n, m) = CTF * X at the half-plane pixels (X shifted by
        -origin) and ctf2 float32 (n, m) = CTF^2 (ones without CTF).
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must have shape (n, {self.box}, {self.box}), got {images.shape}")
        n = len(images)
        centre = self.box // 2
        shifts = np.zeros((n, 2)) if shifts_px is None else np.asarray(shifts_px, np.float64).reshape(-1, 2)
        if len(shifts) != n:
            raise ValueError(f"{len(shifts)} shifts for {n} images")
        terms = np.zeros((0, CTF_TERMS))
        grid = np.zeros((0, 1, 1), np.float32)
        inverse_box_A = 0.0
        if isinstance(ctf, CtfParams):
            if pixel_size_A is None or not pixel_size_A > 0:
                raise ValueError(f"CTF parameters need a positive pixel size, got {pixel_size_A}")
            terms = ctf_terms(ctf)
            if len(terms) != n:
                raise ValueError(f"CTF parameters of {len(terms)} particles for {n} images")
            inverse_box_A = 1.0 / (self.box * pixel_size_A)
        elif ctf is not None:
            grid = np.ascontiguousarray(ctf, np.float32).reshape(n, self.box, self.box // 2 + 1)
        spectra = scipy.fft.rfft2(images, workers=fft_workers())
        data = np.empty((n, len(self.kx)), np.complex64)
        ctf2 = np.empty((n, len(self.kx)), np.float32)
        gather_shift_ctf(spectra, self._rows, self._cols, self._kx64, self._ky64, self._row_ky,
                         np.ascontiguousarray(shifts - centre), terms, grid, inverse_box_A, data, ctf2)
        return data, ctf2

    def insert(self, sums, data, ctf2, rotations, image_of=None, weights=None):
        """Add ``data`` (n, m) at orientations ``rotations`` (k, 3, 3) into ``sums`` in place.

        data : complex64 (n, m), ctf2 : float32 (n, m), from :meth:`image_transforms`.
        image_of : (k,) image row of each orientation (default: one orientation per image).
        weights : (k,) orientation weights tau (default 1).
        """
        self.insert_into(sums.U, sums.rho, data, ctf2, rotations, image_of, weights)

    def insert_into(self, U, rho, data, ctf2, rotations, image_of=None, weights=None):
        """As :meth:`insert`, into the grids U complex64 and rho float32, (M, M, M // 2 + 1), C-contiguous."""
        padded = int(round(self.padding * self.box))
        shape = (padded, padded, padded // 2 + 1)
        for name, grid, dtype in (("U", U, np.complex64), ("rho", rho, np.float32)):
            if grid.shape != shape or grid.dtype != dtype or not grid.flags.c_contiguous:
                raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}, "
                                 f"got {grid.dtype} {grid.shape}")
        data = np.ascontiguousarray(data, np.complex64)
        ctf2 = np.ascontiguousarray(ctf2, np.float32)
        if data.ndim != 2 or data.shape[1] != len(self.kx) or ctf2.shape != data.shape:
            raise ValueError(f"data and ctf2 must have shape (n, {len(self.kx)}), got {data.shape}, {ctf2.shape}")
        rotations = np.asarray(rotations, np.float64).reshape(-1, 3, 3)
        if not np.isfinite(rotations).all():  # the kernels index the grid with them
            raise ValueError("rotations must be finite")
        k = len(rotations)
        image_of = np.arange(k, dtype=np.int64) if image_of is None else np.asarray(image_of, np.int64).ravel()
        weights = np.ones(k, np.float32) if weights is None else np.asarray(weights, np.float32).ravel()
        if len(image_of) != k or len(weights) != k:
            raise ValueError(f"{k} rotations need {k} image indices and weights, got {len(image_of)}, {len(weights)}")
        if k and (image_of.min() < 0 or image_of.max() >= len(data)):
            raise ValueError(f"image indices must lie in [0, {len(data)})")
        if self.symmetry_ops is not None and len(self.symmetry_ops) > 1:
            s = len(self.symmetry_ops)
            rotations = np.einsum("kij,sjl->ksil", rotations, self.symmetry_ops).reshape(-1, 3, 3)
            image_of = np.repeat(image_of, s)
            weights = np.repeat(weights, s)
        width, table, inv_step = self._kernel_args
        threads = thread_count()
        slab_planes = max(1, min(SLAB_PLANES, padded // (SLABS_PER_THREAD * threads)))
        n_slabs = -(-padded // slab_planes)
        n_blocks = -(-padded // ROWS_PER_BLOCK)
        m = len(self.kx)
        batch = max(1, POINTS_PER_BATCH // max(m, 1))
        for start in range(0, len(rotations), batch):
            stop = min(start + batch, len(rotations))
            batch_rotations = np.ascontiguousarray(rotations[start:stop])
            counts = np.zeros((threads, n_slabs * n_blocks), np.int64)
            count_slab_points(batch_rotations, self._kx64, self._ky64, self.padding, width, padded, slab_planes,
                              ROWS_PER_BLOCK, counts)
            bucket_start = np.concatenate([[0], np.cumsum(counts.sum(axis=0))])
            # share t's entries of a bucket follow those of shares 0 .. t-1
            next_free = bucket_start[:-1][None, :] + np.cumsum(counts, axis=0) - counts
            entries = np.empty(bucket_start[-1], np.int32)
            list_slab_points(batch_rotations, self._kx64, self._ky64, self.padding, width, padded, slab_planes,
                             ROWS_PER_BLOCK, next_free, entries)
            slab_start = np.ascontiguousarray(bucket_start[::n_blocks])
            slabs_of_thread, thread_start = balance_slabs(np.diff(slab_start), threads)
            insert_slabs(U, rho, entries, slab_start, slab_planes, slabs_of_thread, thread_start, data, ctf2,
                         np.ascontiguousarray(image_of[start:stop]), batch_rotations,
                         np.ascontiguousarray(weights[start:stop]), self._kx64, self._ky64, self.column_weight,
                         self.padding, width, table, inv_step)

    def insert_images(self, sums, images, rotations, shifts_px=None, ctf=None, image_of=None, weights=None,
                      pixel_size_A=None):
        """Transform real images (n, N, N) and insert them (see :meth:`image_transforms`, :meth:`insert`)."""
        data, ctf2 = self.image_transforms(images, shifts_px, ctf, pixel_size_A)
        self.insert(sums, data, ctf2, rotations, image_of, weights)


def shell_radii(padded_box, box):
    """Radius of every half-grid voxel in unpadded Fourier pixels, float32 (M, M, M // 2 + 1)."""
    f = np.fft.fftfreq(padded_box, 1.0 / padded_box).astype(np.float32) * (box / padded_box)
    fx = np.arange(padded_box // 2 + 1, dtype=np.float32) * (box / padded_box)
    return np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)


def shell_count(box):
    """Number of shells of a half grid's voxels: radii in unpadded pixels reach sqrt(3) N / 2 (rounded)."""
    return int(np.ceil(np.sqrt(3.0) * box / 2.0)) + 2


def wiener_regulariser(sums, fsc):
    """Per-shell 1/SSNR term in rho's units: mean rho of the shell * (1 - FSC) / FSC, float32 (n_shells,).

    Shell s holds the voxels whose radius (unpadded Fourier pixels, :func:`shell_radii`)
    rounds to s; n_shells = :func:`shell_count`. fsc : (n,) FSC per unpadded Fourier
    shell (index = radius in pixels), or None for a tiny regulariser (1e-3 of the
    shell's mean rho) that only avoids division by empty voxels.
    """
    n_shells = shell_count(sums.box)
    M = sums.rho.shape[0]
    totals = np.zeros((M, n_shells))
    counts = np.zeros((M, n_shells), np.int64)
    shell_totals(np.ascontiguousarray(sums.rho, np.float32), sums.box, totals, counts)
    mean_rho = totals.sum(axis=0) / np.maximum(counts.sum(axis=0), 1)
    if fsc is None:
        inverse_ssnr = np.full(n_shells, 1e-3)
    else:
        f = np.clip(np.asarray(fsc, np.float64), 1e-3, 0.999)
        f = np.concatenate([f, np.full(max(0, n_shells - len(f)), 1e-3)])[:n_shells]
        inverse_ssnr = (1.0 - f) / f
    return (mean_rho * inverse_ssnr).astype(np.float32)


def reconstruct_volume(sums, fsc=None, kernel=None, max_radius_px=None, *, overwrite=False):
    """The map from Fourier sums: V = U / (rho + 1/SSNR), back to real space, gridding-corrected.

    Components at radii >= ``max_radius_px`` (unpadded Fourier pixels; default N / 2) are
    zeroed. With ``overwrite=True`` the sums are spent: V is computed in the grid of
    ``sums.U``, and ``sums.U`` and ``sums.rho`` are set to None, which saves a grid of
    memory. Returns float32 (N, N, N), [z, y, x], centre at N // 2.
    """
    kernel = kernel or GriddingKernel()
    regulariser = wiener_regulariser(sums, fsc)
    limit = sums.box / 2.0 if max_radius_px is None else max_radius_px
    U = np.ascontiguousarray(sums.U)
    V = U if overwrite else np.empty_like(U)
    wiener_divide(U, np.ascontiguousarray(sums.rho), regulariser, sums.box, limit, V)
    del U
    if overwrite:
        sums.U = sums.rho = None
    volume = _centre_of_inverse_transform(V, sums.box)
    del V
    return (volume / correction_3d(kernel, sums.box, sums.padding, normalise=True)).astype(np.float32)


def _centre_of_inverse_transform(V, box):
    """The box^3 centre of fftshift(irfftn(V)) for a half grid V (M, M, M // 2 + 1), float32 [z, y, x].

    Transforms one axis at a time, keeping only the centre planes and rows of
    the first two axes (V is overwritten by the first): no temporary holds more
    than box / M of the grid, where irfftn would hold two full grids.
    """
    M = V.shape[0]
    keep = (np.arange(box) - box // 2) % M  # fftshift(x)[start + i] with start = M // 2 - box // 2
    workers = fft_workers()
    V = scipy.fft.ifft(V, axis=0, overwrite_x=True, workers=workers)
    planes = scipy.fft.ifft(V[keep], axis=1, overwrite_x=True, workers=workers)
    del V
    rows = planes[:, keep]
    del planes
    return scipy.fft.irfft(rows, n=M, axis=2, workers=workers)[:, :, keep]


def backproject(sums, kernel=None):
    """Adjoint of :meth:`FourierProjector.project` for images inserted with unit weights.

    Given sums holding insertions of images u (without density division), returns
    the real volume P^T u (float32 (N, N, N)); used to test that projector and
    back-projector are exact adjoints.
    """
    kernel = kernel or GriddingKernel()
    M = sums.U.shape[0]
    N = sums.box
    volume = _centre_of_inverse_transform(sums.U.copy(), N) * (float(M) ** 3 / float(N) ** 2)
    return (volume / correction_3d(kernel, N, sums.padding, normalise=True)).astype(np.float32)
