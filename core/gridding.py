"""Interpolation kernels on the padded 3D Fourier grid, and their real-space gridding correction.

Central sections are read from, and particle transforms inserted into, a 3D
Fourier grid of the volume padded ``padding`` times (2 by default) with a small
separable kernel: Kaiser-Bessel (default, width 3 grid points) or linear (width 2,
RELION's trilinear). Convolving Fourier space with the kernel multiplies real
space by the kernel's continuous Fourier transform; the gridding correction
divides it out (before projecting, and after reconstructing).

Units: kernel offsets ``u`` in padded Fourier grid steps; real-space positions
``x`` in pixels from the box centre; ``M`` the padded box (pixels).
"""

from dataclasses import dataclass

import numpy as np

_TABLE_SAMPLES = 4096


@dataclass(frozen=True)
class GriddingKernel:
    """A separable interpolation kernel w(u) with support |u| <= width / 2.

    ``kind`` is ``"kaiser_bessel"`` (shape ``beta``; default from Beatty et al.
    2005 for 2x oversampling) or ``"linear"`` (trilinear, width 2).
    """

    kind: str = "kaiser_bessel"
    width: int = 3
    beta: float = None

    def __post_init__(self):
        if self.kind not in ("kaiser_bessel", "linear"):
            raise ValueError(f"unknown kernel kind {self.kind!r}")
        if self.kind == "linear" and self.width != 2:
            object.__setattr__(self, "width", 2)
        if self.kind == "kaiser_bessel" and self.beta is None:
            # Beatty, Nishimura & Pauly (2005), oversampling ratio 2.
            alpha = 2.0
            beta = np.pi * np.sqrt((self.width / alpha) ** 2 * (alpha - 0.5) ** 2 - 0.8)
            object.__setattr__(self, "beta", float(beta))

    def __call__(self, u):
        """Kernel weights at offsets ``u`` (grid steps), any shape; 0 outside the support."""
        u = np.abs(np.asarray(u, dtype=np.float64))
        half = self.width / 2.0
        inside = u <= half
        if self.kind == "linear":
            return np.where(inside, 1.0 - u, 0.0)
        arg = np.sqrt(np.clip(1.0 - (u / half) ** 2, 0.0, None))
        return np.where(inside, np.i0(self.beta * arg) / np.i0(self.beta), 0.0)

    def table(self):
        """(weights, step): w sampled at u = 0, step, 2 step... up to width/2, float64, for the kernels."""
        step = (self.width / 2.0) / (_TABLE_SAMPLES - 1)
        return self(np.arange(_TABLE_SAMPLES + 1) * step), step

    def fourier_transform(self, x, padded_box):
        """Continuous FT of w at real-space positions ``x`` (pixels) for a padded box ``M``.

        ``W(x) = integral w(u) cos(2 pi u x / M) du`` (w is even), by quadrature.
        """
        half = self.width / 2.0
        u = np.linspace(-half, half, 4001)
        weights = self(u)
        x = np.asarray(x, dtype=np.float64)
        phase = 2.0 * np.pi * np.multiply.outer(x, u) / padded_box
        return np.trapezoid(weights * np.cos(phase), u, axis=-1) if hasattr(np, "trapezoid") else \
            np.trapz(weights * np.cos(phase), u, axis=-1)

    def correction_1d(self, box, padding):
        """Real-space gridding correction along one axis of a ``box`` volume, shape (box,).

        W(x) at x = i - box // 2 for the padded box ``padding * box``. Divide a
        volume by ``c[z] c[y] c[x]`` before projecting (scale included: the
        kernel's sum of weights); after reconstruction divide by it normalised
        to 1 at the centre (U / rho already divides by the weight sum).
        """
        x = np.arange(box) - box // 2
        return self.fourier_transform(x, padding * box)


def correction_3d(kernel, box, padding, normalise):
    """Separable 3D gridding correction c[z] c[y] c[x], shape (box, box, box), float32."""
    c = kernel.correction_1d(box, padding)
    if normalise:
        c = c / kernel.fourier_transform(0.0, padding * box)
    return (c[:, None, None] * c[None, :, None] * c[None, None, :]).astype(np.float32)
