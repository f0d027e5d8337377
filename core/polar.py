"""Polar Fourier transforms of particle images and of reference central sections.

A :class:`PolarGrid` holds rings k = k_from..k_to (Fourier pixels of the N-pixel
image, i.e. cycles per box) and angles phi_n = 2 pi n / n_rot. A real image has
X(k, phi + pi) = conj X(k, phi) (Friedel), so only n = 0 .. n_rot/2 - 1 is stored:
sections have shape (..., K, n_rot // 2).

References are sampled *directly* from the padded 3D Fourier volume of a
:class:`~prime_plugin.core.projector.FourierProjector` at the rotated polar points
(one interpolation, no Cartesian projection). Particles are normalised on their
background, soft-masked, gridding-corrected, padded, transformed, and sampled at
the same points with the same kind of kernel (2D), centred by their origin
shift and multiplied by their own CTF.

In-plane angle convention (RELION's psi): the central section at (rot, tilt, psi)
is the one at (rot, tilt, 0) with its polar angle advanced by psi,
F_psi(k, phi) = F_0(k, phi + psi).
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.fft

from prime_plugin.core.correlate import ring_powers, ring_spectra
from prime_plugin.core.ctf import ctf_at
from prime_plugin.core.fourier_grid_kernels import as_kernel_args, sample_planes
from prime_plugin.core.gridding import GriddingKernel


def default_n_rot(mask_radius_px):
    """SIMPLE's choice: twice the FFT-friendly size nearest pi * mask radius (px); at least 16."""
    half = scipy.fft.next_fast_len(max(8, int(round(np.pi * mask_radius_px))), real=True)
    return 2 * half


@dataclass(frozen=True)
class PolarGrid:
    """Polar sampling of an image's Fourier transform.

    box : image side N (px); k_from, k_to : first and last ring (Fourier px, integers);
    n_rot : number of in-plane angles (even); half rings of n_rot // 2 are stored.
    """

    box: int
    k_from: int
    k_to: int
    n_rot: int

    def __post_init__(self):
        if self.n_rot < 4 or self.n_rot % 2:
            raise ValueError(f"n_rot must be even and >= 4 (Friedel half rings), got {self.n_rot}")
        if not 1 <= self.k_from <= self.k_to < self.box / 2:
            raise ValueError(f"rings {self.k_from}..{self.k_to} must satisfy 1 <= k_from <= k_to < box/2 = {self.box / 2}")

    @property
    def n_half(self):
        return self.n_rot // 2

    @property
    def rings(self):
        """Ring radii in Fourier pixels, float64 (K,)."""
        return np.arange(self.k_from, self.k_to + 1, dtype=np.float64)

    @property
    def psi_step_deg(self):
        return 360.0 / self.n_rot

    def points(self):
        """(kx, ky), float64 (K, n_rot // 2): Fourier pixel coordinates of the stored half rings."""
        phi = 2.0 * np.pi * np.arange(self.n_half) / self.n_rot
        k = self.rings[:, None]
        return k * np.cos(phi)[None, :], k * np.sin(phi)[None, :]

    @cached_property
    def shift_factors_f32(self):
        """:meth:`shift_factors` as float32 arrays (computed once per grid)."""
        return tuple(t.astype(np.float32) for t in self.shift_factors())

    def shift_factors(self):
        """(t_x, t_y) = 2 pi (kx, ky) / N, float64 (K, n_rot // 2): the phase of a 1-px shift."""
        kx, ky = self.points()
        return 2.0 * np.pi * kx / self.box, 2.0 * np.pi * ky / self.box


def reference_sections(projector, rotations, grid):
    """Polar central sections, complex64 (R, K, n_rot // 2), for rotations (R, 3, 3) (psi = 0)."""
    if projector.box != grid.box:
        raise ValueError(f"projector box {projector.box} differs from the polar grid's {grid.box}")
    kx, ky = grid.points()
    values = projector.sample(rotations, kx.ravel(), ky.ravel())
    return values.reshape(len(values), len(grid.rings), grid.n_half)


def normalise_and_mask(images, mask_radius_px, edge_px=4.0, mask=True):
    """Zero mean and unit deviation on the background (outside the mask), then a soft circular mask.

    images : (P, N, N) float; returns float32 (P, N, N). With ``mask=False`` only normalised.
    """
    images = np.asarray(images, dtype=np.float32)
    box = images.shape[-1]
    c = np.arange(box) - box // 2
    radius = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    background = radius > mask_radius_px + edge_px
    if background.sum() < 16:
        background = radius > 0.8 * box / 2
    mean = images[:, background].mean(axis=1)
    std = images[:, background].std(axis=1)
    std = np.where(std > 0, std, 1.0)
    normalised = (images - mean[:, None, None]) / std[:, None, None]
    if not mask:
        return normalised.astype(np.float32)
    ramp = np.clip((mask_radius_px + edge_px - radius) / edge_px, 0.0, 1.0)
    return normalised * (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)


def _correction_2d(kernel, box, padding):
    c = kernel.correction_1d(box, padding) / kernel.fourier_transform(0.0, padding * box)
    return (c[:, None] * c[None, :]).astype(np.float32)


def polar_transforms(images, grid, padding=2.0, kernel=None):
    """Polar Fourier transforms, complex64 (P, K, n_rot // 2), of (already normalised and masked) images.

    images : (P, N, N) float32, centre at N // 2; grid : PolarGrid with box N. The images are
    gridding-corrected, padded, transformed and sampled at the grid's points (not centred, no CTF).
    """
    kernel = kernel or GriddingKernel()
    images = np.asarray(images, dtype=np.float32)
    P, box = len(images), images.shape[-1]
    if box != grid.box:
        raise ValueError(f"images of box {box} do not match the polar grid's box {grid.box}")
    padded_box = int(round(padding * box))
    padded = np.zeros((P, padded_box, padded_box), np.float32)
    start = padded_box // 2 - box // 2
    padded[:, start:start + box, start:start + box] = images / _correction_2d(kernel, box, padding)
    planes = scipy.fft.rfft2(np.fft.ifftshift(padded, axes=(-2, -1)), workers=-1).astype(np.complex64)
    kx, ky = grid.points()
    out = np.empty((P, kx.size), np.complex64)
    width, table, inv_step = as_kernel_args(kernel)
    sample_planes(planes, kx.ravel(), ky.ravel(), padded_box / box, width, table, inv_step, out)
    return out.reshape(P, len(grid.rings), grid.n_half)


def polar_ctf(ctf, grid, pixel_size_A):
    """Each particle's CTF at the grid's points, float32 (P, K, n_rot // 2), for CtfParams of P particles."""
    kx, ky = grid.points()
    scale = 1.0 / (grid.box * pixel_size_A)
    return np.asarray(ctf_at(ctf, (kx * scale)[None], (ky * scale)[None]), np.float32)


def particle_sections(images, grid, shifts_px=None, ctf=None, pixel_size_A=None, padding=2.0, kernel=None,
                      ring_weights=None, transforms=None):
    """Polar Fourier transforms of (already normalised and masked) particle images, ready to correlate.

    Parameters
    ----------
    images : (P, N, N) float32, centre at N // 2 (unused when ``transforms`` is given).
    grid : PolarGrid with box N.
    shifts_px : (P, 2), optional
        RELION origins (x, y) in pixels; the particles are centred by them.
    ctf : CtfParams with fields of shape (P,), optional
        Each particle's polar FT is multiplied by its own CTF (needs ``pixel_size_A``).
    ring_weights : float32 (P, K), optional
        Each ring's weight, 1 / noise power (:mod:`~prime_plugin.core.noise`): multiplies the
        sections, ``ctf2`` and ``powers``, so that the correlation weighs ring k's terms by it.
    transforms : complex64 (P, K, n_rot // 2), optional
        :func:`polar_transforms` of the images, when already computed.

    Returns
    -------
    PolarParticles
        sections complex64 (P, K, n_rot // 2) (CTF-multiplied, weighted), ctf2 float32 (P, K)
        the ring means of CTF^2 (ones without CTF) times the weights, powers float32 (P, K) the
        ring powers of the particles as observed (before the CTF) times the weights.
    """
    sections = polar_transforms(images, grid, padding, kernel) if transforms is None else transforms
    P = len(sections)
    if shifts_px is not None:
        sections = apply_shifts(sections, grid, shifts_px)
    powers = ring_powers(sections)
    ctf2 = np.ones((P, len(grid.rings)), np.float32)
    if ctf is not None:
        if pixel_size_A is None:
            raise ValueError("particle_sections needs pixel_size_A to evaluate the CTF")
        values = polar_ctf(ctf, grid, pixel_size_A)
        sections = sections * values
        ctf2 = (values.astype(np.float64) ** 2).mean(axis=-1).astype(np.float32)
    if ring_weights is not None:
        weights = np.asarray(ring_weights, np.float32)
        sections = sections * weights[:, :, None]
        ctf2 = ctf2 * weights
        powers = powers * weights
    return PolarParticles(sections.astype(np.complex64), ctf2, powers)


@dataclass
class PolarParticles:
    """Particles on a polar grid (see :func:`particle_sections`); arrays indexed by particle first."""

    sections: np.ndarray
    ctf2: np.ndarray
    powers: np.ndarray

    def __len__(self):
        return len(self.sections)

    def take(self, rows):
        """The particles ``rows`` (int array)."""
        return PolarParticles(self.sections[rows], self.ctf2[rows], self.powers[rows])

    def centred_spectra(self, grid, shifts_px):
        """Ring spectra (P, K, h + 1) of the particles centred by RELION origins ``shifts_px`` (P, 2)."""
        return ring_spectra(apply_shifts(self.sections, grid, shifts_px))


def apply_shifts(sections, grid, shifts_px):
    """Centre particles with RELION origins (x, y) px: X(k, phi) * exp(-i (t_x x0 + t_y y0)), complex64.

    Phases in float32 (errors ~1e-6 rad at the outer rings; float64 phases and a complex128 exp made
    this 16x slower, and the local search calls it once per particle block and origin offset)."""
    t_x, t_y = grid.shift_factors_f32
    s = np.asarray(shifts_px, dtype=np.float32).reshape(-1, 2)
    phase = t_x[None] * s[:, 0, None, None] + t_y[None] * s[:, 1, None, None]
    factor = np.empty(phase.shape, np.complex64)
    factor.real = np.cos(phase)
    factor.imag = -np.sin(phase)
    return (sections * factor).astype(np.complex64, copy=False)
