"""The box an iteration works at: the particles cropped in Fourier space to what the alignment limit needs.

An iteration aligning to ring k (Fourier px of the N-px images) uses no information
beyond it, so its search and insertion run on images and maps Fourier-cropped to a
box M of about 2 (k + WORK_MARGIN_PX) (RELION's current_size, SIMPLE's cropping):
the same physical box at the coarser pixel size N apix / M, the same frequencies
k / (N apix) up to M / 2. The margin lets the FSC show, beyond the limit, how far the
next iteration may align (the limit grows by at most about the margin per iteration).
The final maps are made at the full box.

Fourier resizing here keeps the transform (not the pixel values): a cropped image's
discrete Fourier transform equals the full image's at every kept frequency, so polar
transforms, CTF products, noise powers, contrast scales and Fourier sums mean the
same at every box. A padded grid of Fourier sums of box M has the frequency step
1 / (2 N apix) of box N's, so sums made at a smaller box are the centre of a larger
box's (:meth:`~prime_plugin.core.reconstruct.FourierSums.grown`).
"""

from dataclasses import dataclass

import numpy as np
import scipy.fft
from prime_plugin.core.fourier import fft_workers, shell_index
from prime_plugin.core.resample import resample_volume

__all__ = [
    "BOX_STEP_PX",
    "WORK_MARGIN_PX",
    "WorkingBox",
    "fourier_resize",
    "insertion_radius_px",
    "working_box",
    "working_box_size",
]

WORK_MARGIN_PX = 10  # Fourier px beyond the alignment limit the sums hold (RELION's --incr_size)
BOX_STEP_PX = 8  # working boxes are multiples of this (fewer distinct sizes, FFT-friendly)
EDGE_GUARD_PX = 2  # a cropped insertion stops this far inside Nyquist: the kernel's footprint must not wrap


@dataclass
class WorkingBox:
    """One iteration's working box. box : M (px); full_box : N (px); pixel_size_A : N apix / M;
    mask : float32 (M, M, M), the refinement's mask at this box (values in [0, 1])."""

    box: int
    full_box: int
    pixel_size_A: float
    mask: np.ndarray

    @property
    def cropped(self):
        return self.box < self.full_box

    @property
    def scale(self):
        """Working px per stored px (M / N)."""
        return self.box / self.full_box

    @property
    def valid_shells(self):
        """Fourier shells 0 .. valid_shells - 1 hold every inserted pixel of their radius (the others, near a
        cropped box's edge, only the gridding kernel's spill: their FSC means nothing)."""
        radius = insertion_radius_px(self.box, self.full_box)
        return self.box // 2 + 1 if radius is None else int(np.floor(radius))

    def written(self, volume):
        """A map of this box (float32 (M, M, M)) as written: at the full box, with nothing at the shells
        from valid_shells on (the reported FSC is zero there, and so is the written maps' own)."""
        if self.cropped:
            spectrum = scipy.fft.rfftn(np.asarray(volume, np.float32), workers=fft_workers())
            spectrum[shell_index(self.box) >= self.valid_shells] = 0
            volume = scipy.fft.irfftn(spectrum, s=volume.shape, workers=fft_workers())
        return fourier_resize(volume, self.full_box)

    def full_length(self, curve):
        """An FSC measured at this box, as a curve of the full box's N // 2 + 1 shells: zero from
        valid_shells on (no information was used there)."""
        full = np.zeros(self.full_box // 2 + 1)
        kept = min(len(curve), self.valid_shells, len(full))
        full[:kept] = curve[:kept]
        return full


def working_box_size(full_box, ring_limit, current=0):
    """M for alignment limit ``ring_limit`` (Fourier px): the smallest multiple of BOX_STEP_PX holding
    ring_limit + WORK_MARGIN_PX inside its insertion radius, never smaller than ``current`` (sums made at
    a box can grow, not shrink), at most ``full_box``."""
    needed = 2 * (int(ring_limit) + WORK_MARGIN_PX + EDGE_GUARD_PX + 1)
    size = BOX_STEP_PX * int(np.ceil(needed / BOX_STEP_PX))
    return int(min(full_box, max(size, current)))


def insertion_radius_px(box, full_box):
    """The radius (Fourier px, exclusive) up to which images are inserted at working box ``box``:
    Nyquist at the full box, else EDGE_GUARD_PX inside it (what a smaller box's sums hold must
    be exactly the centre of a larger box's)."""
    return None if box >= full_box else box / 2.0 - EDGE_GUARD_PX


def working_box(size, full_box, pixel_size_A, mask):
    """A :class:`WorkingBox` of ``size`` px for stored boxes of ``full_box`` px at ``pixel_size_A``; ``mask``
    float32 (N, N, N) resampled to it (Fourier cropping, pixel values kept, clipped to [0, 1])."""
    if size == full_box:
        return WorkingBox(full_box, full_box, pixel_size_A, mask)
    small, _ = resample_volume(mask, pixel_size_A, pixel_size_A * full_box / size, size)
    return WorkingBox(size, full_box, pixel_size_A * full_box / size,
                      np.clip(small, 0.0, 1.0).astype(np.float32))


def fourier_resize(array, box, dims=None):
    """Crop or zero-pad the Fourier transform of the last ``dims`` axes (default all, at most 3) to ``box``.

    array : float (..., N, N) images or (N, N, N) a map, centre at N // 2. Returns float32 (..., M, M) or
    (M, M, M) whose discrete Fourier transform equals ``array``'s at every frequency whose components are
    all below min(N, M) / 2 in magnitude, and is zero at the others (the transform is kept, so pixel
    values scale by (N / M)^dims). The same array when M == N.
    """
    array = np.asarray(array, np.float32)
    dims = min(array.ndim, 3) if dims is None else dims
    n = array.shape[-1]
    if box == n:
        return array
    axes = tuple(range(-dims, 0))
    spectrum = scipy.fft.rfftn(np.fft.ifftshift(array, axes=axes), axes=axes, workers=fft_workers())
    half = min(n, box) // 2
    out = np.zeros(array.shape[:-dims] + (box,) * (dims - 1) + (box // 2 + 1,), np.complex64)
    # Full axes keep frequencies -half..half-1 (the lower index blocks :half and -half:); the halved last
    # axis keeps 0..half.
    blocks = [(slice(0, half), slice(-half, None))] * (dims - 1)
    for corner in np.ndindex(*(2,) * (dims - 1)):
        index = (Ellipsis,) + tuple(blocks[a][c] for a, c in enumerate(corner)) + (slice(0, half + 1),)
        out[index] = spectrum[index]
    # The smaller box's Nyquist terms (frequency -half on the full axes, half on the last) are dropped: they
    # stand for both +half and -half, which only one of the two boxes can hold apart.
    for axis in range(dims - 1):
        out[(Ellipsis,) + (slice(None),) * axis + (-half,) + (slice(None),) * (dims - 1 - axis)] = 0
    out[..., half] = 0
    resized = scipy.fft.irfftn(out, s=(box,) * dims, axes=axes, workers=fft_workers())
    return np.fft.fftshift(resized, axes=axes).astype(np.float32)
