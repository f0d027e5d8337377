"""Mask-corrected Fourier shell correlation (Chen et al. 2013), as relion_postprocess computes it.

A mask with edges correlates two half maps at high resolution by itself: both are
multiplied by the same function, so the masked maps share the mask's fine detail.
Chen et al. measure that share by repeating the masked FSC on half maps whose phases
beyond some shell are random (their true correlation there is zero, so what is left
is the mask's doing) and remove it:
FSC_true = (FSC_masked - FSC_rand) / (1 - FSC_rand).

The details follow RELION 3.1's relion_postprocess (src/postprocessing.cpp,
src/fftw.cpp), checked against the program in tests/test_fsc_correction.py:

- Randomisation shell: the first shell k >= 1 where the *unmasked* FSC drops below
  0.8 (strictly), the shell RELION prints as "randomize phases beyond: N apix / k
  Angstroms". RELION stops with an error when it never drops; so does this module.
- Both half maps are phase-randomised with independent random phases (RELION draws
  the two maps' phases one after the other from its one generator), then masked.
- FSC_true is FSC_masked below shell k + 2 and Chen's formula from k + 2 on: RELION
  starts two shells above the randomisation shell "because of small artefacts near
  the resolution of randomisation", with no clipping of negative values.
- FSC: RELION sums every element of the rfftn half grid once, shells by rounded
  radius from 0 to N // 2 (the Nyquist shell included, the corners beyond it left
  out). That counts both members of each conjugate pair on the kx = 0 (and, for an
  even box, kx = N/2) planes but one member elsewhere, where ``fourier.fsc`` weights
  the half grid to the whole sphere; the two differ by up to 1e-2 per shell on a
  64^3 map. This module uses RELION's sum so that its curves are RELION's.
- Which components: RELION randomises every component whose radius is >= k, so the
  inner half of FSC shell k (radius in [k - 0.5, k)) keeps its phases and RELION's
  FSC_rand at shell k stays high (e.g. 0.6 where randomising all of shell k gives
  0.2). ``corrected_fsc`` does the same; ``randomise_phases`` offers both
  (``boundary="radius"`` or whole shells, ``"shell"``, its default).
- Where this module differs, on purpose: RELION draws a phase for every stored
  half-grid element, so the two members of a conjugate pair on the self-conjugate
  planes get unrelated phases and the inverse transform keeps only their Hermitian
  part (their amplitudes shrink). Here the phases are Hermitian from the start and
  every amplitude is kept. RELION's random numbers cannot be reproduced, so FSC_rand
  (hence FSC_true from k + 2 on) agrees with RELION's statistically, not digit for
  digit.
- Left to the caller: RELION's fallback to the unmasked FSC when that reaches a
  higher resolution than the corrected one (unless --force_mask), its warning when
  FSC_rand exceeds 0.1 at the resolution, and its resolution without interpolation
  (the last shell before FSC_true first drops below 0.143); here resolutions come
  from ``fourier.resolution_at`` (linear interpolation). RELION also writes 1 for
  the masked and randomised FSC at shell 0 when they come out <= 0; shell 0 is
  left as computed here (no resolution reads it).

Volumes are float arrays ``v[z, y, x]`` with a cubic box N; shell k lies at
k / (N * pixel size) 1/A.
"""

from dataclasses import dataclass
from typing import Union

import numpy as np
import scipy.fft

from prime_plugin.core.fourier import fft_workers, resolution_at, shell_index

__all__ = ["CorrectedFsc", "randomise_phases", "corrected_fsc"]

RESOLUTION_THRESHOLD = 0.143
# RELION applies Chen's formula from two shells above the randomisation shell.
CORRECTION_START_OFFSET = 2


@dataclass
class CorrectedFsc:
    """FSC curves of two half maps with and without a mask, and the corrected one.

    Curves are float64 (N // 2 + 1,), shell k at k / (N * pixel_size_A) 1/A. The
    randomisation shell is also given in Angstrom, N * pixel_size_A / shell (RELION's
    rlnRandomiseFrom).
    Resolutions in Angstrom, where the curve first drops below 0.143
    (``fourier.resolution_at``: interpolated, Nyquist when it never drops).
    """

    unmasked: np.ndarray
    masked: np.ndarray
    randomised_masked: np.ndarray
    corrected: np.ndarray
    randomise_from_shell: int
    randomise_from_A: float
    pixel_size_A: float
    res_unmasked_A: float
    res_masked_A: float
    res_randomised_masked_A: float
    res_corrected_A: float


def _check_volume(volume, name):
    volume = np.asarray(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"{name} must be a cubic 3D map (z, y, x), got shape {volume.shape}")
    if not np.isrealobj(volume):
        raise TypeError(f"{name} must be real, got dtype {volume.dtype}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{name} holds NaN or infinite voxels")
    return volume


def _check_generator(rng):
    if rng is None:
        return np.random.default_rng(0)  # RELION's default --random_seed is 0: deterministic
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def _spectrum(volume):
    return scipy.fft.rfftn(np.asarray(volume, np.float64), workers=fft_workers())


def _half_grid_fsc(f1, f2, shells):
    """RELION's getFSC: every rfftn element once, shells 0..N//2, float64 (N // 2 + 1,)."""
    n = shells.shape[0] // 2 + 1
    keep = shells < n
    s = shells[keep]
    a, b = f1[keep], f2[keep]
    cross = np.bincount(s, weights=(a * np.conj(b)).real, minlength=n)
    p1 = np.bincount(s, weights=a.real ** 2 + a.imag ** 2, minlength=n)
    p2 = np.bincount(s, weights=b.real ** 2 + b.imag ** 2, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = cross / np.sqrt(p1 * p2)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _fourier_radius(box):
    """Radius in Fourier pixels of every voxel of an rfftn half grid, float64 (N, N, N // 2 + 1)."""
    f = np.fft.fftfreq(box, 1.0 / box)
    fx = np.arange(box // 2 + 1)
    return np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)


def _beyond(box, from_shell, boundary):
    """Half-grid voxels to randomise: shells >= from_shell, or radius >= from_shell (RELION)."""
    if boundary == "shell":
        return shell_index(box) >= from_shell
    if boundary == "radius":
        return _fourier_radius(box) >= from_shell
    raise ValueError(f"boundary must be 'shell' or 'radius', got {boundary!r}")


def _randomised(spectrum, beyond, rng, shape):
    """Real-space float64 map of ``spectrum`` with random phases where ``beyond`` (half grid) is set."""
    # The phases come from the transform of real white noise: uniform, independent between
    # components, and Hermitian where the half grid must be (the kx = 0 plane and, for an even
    # box, kx = N/2; self-conjugate voxels get a random sign), so the result stays real.
    noise = scipy.fft.rfftn(rng.standard_normal(shape), workers=fft_workers())
    size = np.abs(noise)
    unit = np.divide(noise, size, out=np.ones_like(noise), where=size > 0)
    out = spectrum.copy()
    out[beyond] = np.abs(spectrum[beyond]) * unit[beyond]
    return scipy.fft.irfftn(out, s=shape, workers=fft_workers())


def randomise_phases(volume: np.ndarray, from_shell: int, rng: np.random.Generator, *,
                     boundary: str = "shell") -> np.ndarray:
    """The volume with random phases at every Fourier shell >= ``from_shell``.

    Parameters
    ----------
    volume : ndarray, real, shape (N, N, N), order [z, y, x]
    from_shell : int >= 1
        First shell (rounded radius in Fourier pixels, ``fourier.shell_index``) whose
        phases are replaced; shells below keep theirs. Shells above N // 2 (the
        corners) are randomised too.
    rng : numpy.random.Generator
        Source of the phases (uniform on [0, 2 pi), independent between components
        apart from the Hermitian pairs); the same generator state gives the same map.
    boundary : {"shell", "radius"}
        "shell": every component whose rounded radius is >= ``from_shell`` (all of
        that FSC shell). "radius": every component whose radius is >= ``from_shell``,
        RELION's randomizePhasesBeyond (the inner half of shell ``from_shell`` keeps
        its phases).

    Returns
    -------
    ndarray, float32, shape (N, N, N)
        Real map with every Fourier amplitude of ``volume`` kept.

    Raises
    ------
    ValueError
        The volume is not a finite cubic 3D map, ``from_shell`` < 1, or an unknown boundary.
    TypeError
        ``rng`` is not a numpy Generator, or the volume is complex.
    """
    volume = _check_volume(volume, "volume")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(from_shell, bool) or not isinstance(from_shell, (int, np.integer)) or from_shell < 1:
        raise ValueError(f"from_shell must be a whole number >= 1 (shell 0 is the mean), got {from_shell!r}")
    beyond = _beyond(volume.shape[0], int(from_shell), boundary)
    return _randomised(_spectrum(volume), beyond, rng, volume.shape).astype(np.float32)


def _randomisation_shell(unmasked, threshold):
    below = np.nonzero(unmasked[1:] < threshold)[0]
    if below.size == 0:
        raise ValueError(f"the unmasked FSC never drops below {threshold} (up to Nyquist): no shell to randomise "
                         "phases from (RELION stops here too)")
    return int(below[0]) + 1


def corrected_fsc(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray, pixel_size_A: float,
                  rng: Union[np.random.Generator, int, None] = None, threshold: float = 0.8) -> CorrectedFsc:
    """Masked FSC of two half maps corrected for the mask by phase randomisation (Chen et al. 2013).

    RELION's rule (module docstring): randomise phases of both half maps, independently,
    from the first shell k >= 1 where the unmasked FSC drops below ``threshold``; mask;
    FSC_rand; FSC_true = FSC_masked below k + 2, (FSC_masked - FSC_rand) / (1 - FSC_rand)
    from k + 2 on.

    Parameters
    ----------
    half1, half2 : ndarray, real, shape (N, N, N), order [z, y, x]
        The two independent half-set reconstructions, unmasked.
    mask : ndarray, real, shape (N, N, N), values in [0, 1]
        Soft solvent mask (1 = particle), applied by multiplication as RELION does.
    pixel_size_A : float
        Voxel size in Angstrom.
    rng : numpy.random.Generator, int or None
        Source of the random phases; an int seeds a new generator, None means seed 0.
    threshold : float
        Unmasked FSC below which phases are randomised (RELION's --randomize_at_fsc).

    Returns
    -------
    CorrectedFsc

    Raises
    ------
    ValueError
        Shapes differ or are not cubic 3D, non-finite voxels, mask values outside
        [0, 1] (to 1e-6, RELION's tolerance), a pixel size <= 0, or an unmasked FSC
        that never drops below ``threshold``.
    TypeError
        ``rng`` of the wrong type, or complex maps.
    """
    half1 = _check_volume(half1, "half1")
    half2 = _check_volume(half2, "half2")
    mask = _check_volume(mask, "mask")
    if not half1.shape == half2.shape == mask.shape:
        raise ValueError(f"half1, half2 and mask differ in shape: {half1.shape}, {half2.shape}, {mask.shape}")
    if mask.min() < -1e-6 or mask.max() > 1 + 1e-6:
        raise ValueError(f"mask values must lie in [0, 1], found [{mask.min():g}, {mask.max():g}]")
    if not np.isfinite(pixel_size_A) or pixel_size_A <= 0:
        raise ValueError(f"pixel_size_A must be a positive number of Angstrom, got {pixel_size_A!r}")
    rng = _check_generator(rng)
    box = half1.shape[0]
    shells = shell_index(box)
    mask = np.asarray(mask, np.float64)

    spectrum1, spectrum2 = _spectrum(half1), _spectrum(half2)
    unmasked = _half_grid_fsc(spectrum1, spectrum2, shells)
    masked = _half_grid_fsc(_spectrum(half1 * mask), _spectrum(half2 * mask), shells)
    from_shell = _randomisation_shell(unmasked, threshold)
    beyond = _beyond(box, from_shell, "radius")  # as RELION, so that FSC_rand at shell k is RELION's too
    random1 = _randomised(spectrum1, beyond, rng, half1.shape)
    random2 = _randomised(spectrum2, beyond, rng, half2.shape)  # independent of half1's phases, as RELION
    randomised_masked = _half_grid_fsc(_spectrum(random1 * mask), _spectrum(random2 * mask), shells)

    corrected = masked.copy()
    start = from_shell + CORRECTION_START_OFFSET
    t, n = masked[start:], randomised_masked[start:]
    with np.errstate(invalid="ignore", divide="ignore"):
        corrected[start:] = np.where(n < 1.0, (t - n) / (1.0 - n), 0.0)

    def res(curve):
        return resolution_at(curve, RESOLUTION_THRESHOLD, box, pixel_size_A)

    return CorrectedFsc(unmasked=unmasked, masked=masked, randomised_masked=randomised_masked, corrected=corrected,
                        randomise_from_shell=from_shell, randomise_from_A=box * pixel_size_A / from_shell,
                        pixel_size_A=float(pixel_size_A),
                        res_unmasked_A=res(unmasked), res_masked_A=res(masked),
                        res_randomised_masked_A=res(randomised_masked), res_corrected_A=res(corrected))
