"""RELION's contrast transfer function (CTF), evaluated anywhere in Fourier space.

The model is RELION's ``CTF::getCTF`` (src/ctf.h, ctf.cpp, 3.1):

    gamma(k) = -pi * lambda * (dU * k_u^2 + dV * k_v^2) + pi/2 * Cs * lambda^3 * |k|^4
               - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    CTF(k)   = -sin(gamma(k)) * exp(-B/4 * |k|^2) * scale

with k in 1/A, k_u / k_v the components of k along / across the astigmatism
angle (measured from the x axis towards y), defocus positive for underfocus. So
CTF(0) = sin(phase_shift + asin(Q0)) = +Q0 without phase plate: the low
frequencies are positive, and the first lobe is positive.

Layouts (see :func:`ctf_image`): the full grid is centred (origin at box // 2,
index [ky, kx]); the rfft grid is numpy's ``rfft2`` layout, with the even-box
Nyquist row taken as +N/2 like RELION's ``getFftwImage`` (numpy's ``fftfreq``
says -N/2; the two differ there for astigmatic CTFs only).
Unlike RELION, |CTF| is not clamped to >= 1e-8 (RELION does it for its GPU code).
"""

from dataclasses import dataclass, fields

import numba
import numpy as np

from .errors import PrimeInputError

# RELION column -> CtfParams field; None: required column.
_STAR_COLUMNS = {
    "rlnDefocusU": ("defocus_u_A", None),
    "rlnDefocusV": ("defocus_v_A", None),
    "rlnDefocusAngle": ("defocus_angle_deg", None),
    "rlnVoltage": ("voltage_kV", None),
    "rlnSphericalAberration": ("cs_mm", None),
    "rlnAmplitudeContrast": ("amplitude_contrast", None),
    "rlnPhaseShift": ("phase_shift_deg", 0.0),
    "rlnCtfBfactor": ("bfactor_A2", 0.0),
    "rlnCtfScalefactor": ("scale", 1.0),
}


@dataclass(frozen=True)
class CtfParams:
    """CTF parameters of one particle (floats) or of n particles (float64 arrays of shape (n,)).

    Defocus in Angstrom (positive = underfocus), astigmatism angle in degrees from
    the x axis to the U direction, voltage in kV, Cs in mm, amplitude contrast Q0
    as a fraction in [0, 1], phase-plate shift in degrees, B-factor in A^2.
    """

    defocus_u_A: float
    defocus_v_A: float
    defocus_angle_deg: float
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float
    phase_shift_deg: float = 0.0
    bfactor_A2: float = 0.0
    scale: float = 1.0

    @classmethod
    def from_star(cls, particles, path=None):
        """Per-particle parameters, arrays of shape (n,), from a RELION particles table.

        ``particles``: pandas DataFrame with RELION columns, optics columns (voltage,
        Cs, amplitude contrast) already merged in per particle. rlnPhaseShift,
        rlnCtfBfactor and rlnCtfScalefactor are optional (0, 0, 1 as in RELION).
        ``path`` only names the file in error messages.
        """
        missing = [c for c, (_, default) in _STAR_COLUMNS.items() if default is None and c not in particles]
        if missing:
            raise PrimeInputError(f"particles table lacks CTF column(s) {', '.join(missing)}", path)
        n = len(particles)
        values = {}
        for column, (name, default) in _STAR_COLUMNS.items():
            if column in particles:
                values[name] = particles[column].to_numpy(dtype=np.float64)
            else:
                values[name] = np.full(n, default)
        q0 = values["amplitude_contrast"]
        if np.any((q0 < 0) | (q0 > 1)):
            raise PrimeInputError(f"rlnAmplitudeContrast must lie in [0, 1], got {q0[(q0 < 0) | (q0 > 1)][0]}", path)
        return cls(**values)

    def take(self, rows):
        """The parameters of particles ``rows`` (int array) of per-particle parameters (fields given as one
        scalar for all particles stay scalar)."""
        return CtfParams(**{f.name: np.asarray(getattr(self, f.name))[rows] if np.ndim(getattr(self, f.name))
                            else getattr(self, f.name) for f in fields(self)})

    def __len__(self):
        """Number of particles (1 for scalar parameters)."""
        return int(np.size(self.defocus_u_A))

    def is_batch(self):
        """True when the fields are arrays of shape (n,), one value per particle."""
        return np.ndim(self.defocus_u_A) > 0


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV (as RELION)."""
    volts = np.asarray(voltage_kV, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))


def _check_field_shapes(params):
    """Raise ValueError unless every field is a scalar or of shape (n,)."""
    for f in fields(params):
        value = np.asarray(getattr(params, f.name))
        if value.ndim > 1:
            raise ValueError(f"CtfParams.{f.name} must be a scalar or of shape (n,), got shape {value.shape}")


def relion_ctf(kx, ky, cos_angle, sin_angle, u_term, v_term, cs_term, phase_rad, quarter_bfactor, scale):
    """RELION's CTF from precomputed per-particle terms (:func:`ctf_terms`); the one copy of the formula.

    Plain arithmetic and ``np.sin`` / ``np.exp``, so that it runs on numpy arrays
    (broadcasting, in :func:`ctf_at`) and, compiled by numba, on scalars inside
    kernels (:data:`relion_ctf_scalar`). kx, ky in 1/Angstrom.
    """
    k_u = cos_angle * kx + sin_angle * ky  # component along the U axis
    k_v = -sin_angle * kx + cos_angle * ky
    k2 = kx * kx + ky * ky
    gamma = -(u_term * k_u * k_u + v_term * k_v * k_v) + cs_term * k2 * k2 - phase_rad
    return -np.sin(gamma) * np.exp(-quarter_bfactor * k2) * scale


relion_ctf_scalar = numba.njit(inline="always")(relion_ctf)
""":func:`relion_ctf` compiled for float64 scalars, for use inside numba kernels."""

CTF_TERMS = 8  # columns of ctf_terms()


def ctf_terms(params):
    """Per-particle terms of :func:`relion_ctf`, float64 (n, 8) (n = 1 for scalar params).

    Columns: cos and sin of the astigmatism angle, pi lambda defocus_U, pi lambda
    defocus_V (A / A^-2 units: multiply by k^2), pi/2 Cs lambda^3, phase shift +
    amplitude-contrast phase (radians), B / 4 (A^2), scale.
    """
    # Contiguous: numpy's SIMD arctan2/cos/sin then always run (see geometry.py on why that matters).
    p = {f.name: np.ascontiguousarray(np.atleast_1d(getattr(params, f.name)), dtype=np.float64)
         for f in fields(params)}
    q0 = p["amplitude_contrast"]
    if np.any((q0 < 0) | (q0 > 1)):
        raise ValueError(f"amplitude contrast must lie in [0, 1], got {params.amplitude_contrast}")
    wavelength = electron_wavelength_A(p["voltage_kV"])
    angle = np.deg2rad(p["defocus_angle_deg"])
    # arctan2 is RELION's atan(Q0 / sqrt(1 - Q0^2)) without the division by zero at Q0 = 1
    amplitude_phase = np.arctan2(q0, np.sqrt(1.0 - q0 * q0))
    columns = np.broadcast_arrays(
        np.cos(angle), np.sin(angle), np.pi * wavelength * p["defocus_u_A"], np.pi * wavelength * p["defocus_v_A"],
        0.5 * np.pi * p["cs_mm"] * 1e7 * wavelength**3, np.deg2rad(p["phase_shift_deg"]) + amplitude_phase,
        0.25 * p["bfactor_A2"], p["scale"])
    return np.ascontiguousarray(np.stack(columns, axis=1))


def ctf_at(params, kx, ky):
    """RELION's CTF at spatial frequencies (kx, ky) in 1/Angstrom; float32.

    ``kx``, ``ky``: arrays of any matching shape. With scalar ``params`` the result
    has their broadcast shape. With per-particle ``params`` (fields of shape (n,)),
    the parameters are aligned with the *leading* axis of the points: points of
    shape (n, ...) give one CTF per particle at its own points, points of shape
    (1, ...) (e.g. a polar grid passed as ``kx[None]``) are shared by all
    particles; both give shape (n, ...).
    """
    kx = np.asarray(kx, dtype=np.float64)
    ky = np.asarray(ky, dtype=np.float64)
    ndim = max(kx.ndim, ky.ndim)
    if params.is_batch():
        n = len(params)
        lead = np.broadcast_shapes(kx.shape, ky.shape)[:1]
        if lead not in ((n,), (1,)):
            raise ValueError(
                f"points of shape {np.broadcast_shapes(kx.shape, ky.shape)} do not align with {n} particles: "
                "pass shape (n, ...) per particle, or (1, ...) (kx[None]) for points shared by all"
            )
    _check_field_shapes(params)
    terms = ctf_terms(params)
    if params.is_batch():  # one column per term, aligned with the points' leading axis
        columns = [terms[:, c].reshape((len(terms),) + (1,) * max(ndim - 1, 0)) for c in range(CTF_TERMS)]
    else:
        columns = list(terms[0])
    return relion_ctf(kx, ky, *columns).astype(np.float32)


def fourier_grid(box, pixel_size_A, *, rfft=False):
    """Spatial frequencies (kx, ky) in 1/Angstrom of a box x box image's Fourier grid.

    Full layout (``rfft=False``): shape (box, box), index [ky, kx], origin at
    box // 2 (fftshift order). rfft layout: shape (box, box // 2 + 1), numpy's
    unshifted ``rfft2`` order, with RELION's +N/2 for the even-box Nyquist row.
    """
    if box < 1 or pixel_size_A <= 0:
        raise ValueError(f"need box >= 1 and pixel size > 0, got box={box}, pixel_size_A={pixel_size_A}")
    extent_A = box * pixel_size_A
    if rfft:
        rows = np.arange(box)
        ky = np.where(rows <= box // 2, rows, rows - box) / extent_A  # RELION's FFTW convention
        kx = np.arange(box // 2 + 1) / extent_A
    else:
        ky = kx = (np.arange(box) - box // 2) / extent_A
    return np.meshgrid(kx, ky, indexing="xy")


def ctf_image(params, box, pixel_size_A, *, rfft=False):
    """RELION's CTF on the Fourier grid of a box x box image with the given pixel size; float32.

    Shape (box, box) in the centred full layout, or (box, box // 2 + 1) with
    ``rfft=True`` (see :func:`fourier_grid`), so that
    ``np.fft.irfft2(np.fft.rfft2(img) * ctf_image(p, box, apix, rfft=True), s=img.shape)``
    applies the CTF to ``img[y, x]`` exactly as RELION's relion_project does.
    Per-particle ``params`` (fields of shape (n,)) give a stack (n, ...).
    """
    kx, ky = fourier_grid(box, pixel_size_A, rfft=rfft)
    if params.is_batch():
        kx, ky = kx[None], ky[None]
    return ctf_at(params, kx, ky)
