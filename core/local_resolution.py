"""Local resolution of two half maps, as relion_postprocess --locres (RELION 3.1) measures it.

The FSC between the half maps is measured inside soft spheres centred on a grid, each
corrected for the sphere's own correlation by phase randomisation (Chen et al. 2013), and
the resolution where it drops below 0.143 is spread back over the sphere. The rules follow
RELION 3.1.3 (src/postprocessing.cpp, run_locres), checked against the program in
tests/test_local_resolution.py:

- Grid: centres every ``step = round(sampling / pixel size)`` voxels along each axis, from
  -N // 2 (the box centre at N // 2, as everywhere here), kept where their distance to the
  box centre is < N // 2 - round(radius / pixel size).
- Sphere: 1 within ``radius`` voxels of the centre (round(radius_A / pixel size); default
  radius half the sampling), a raised cosine over the next ``edge`` voxels
  (round(edge_A / pixel size); default the sampling), 0 beyond; not periodic.
- Phases of both unmasked half maps randomised once, from shell k = int(N * pixel size /
  randomise_at_A) (every Fourier component of radius >= k, ``fsc_correction``), the same
  randomised maps for every sphere.
- Per sphere: FSC of the masked half maps and of the masked randomised ones (every rfftn
  element once, ``fsc_correction``), each set to 1 at shell 0 when <= 0 there; corrected
  FSC = masked FSC below shell k + 2, (masked - random) / (1 - random) from k + 2 on. Note:
  k comes from ``randomise_at_A``, not from the unmasked FSC as in the global correction.
- Local resolution of the sphere: N * pixel size / i at the last shell i before the
  corrected FSC first drops below 0.143 (999 A when shell 1 does), at most ``min_resolution_A``.
- Local-resolution map: the sphere masks' weighted harmonic mean of the spheres'
  resolutions, sum(m) / sum(m / res); 0 where no sphere reaches.
- Locally filtered map: each sphere's map (the half maps' average, divided by the MTF and
  sharpened by ``bfactor_A2`` up to Nyquist, weighted by sqrt(2 FSC / (1 + FSC)) of its own
  corrected FSC, low-pass filtered at its resolution with RELION's raised cosine two shells
  wide) blended by the sphere masks, sum(m x map) / sum(m).

Where this module differs on purpose: the filtered map starts from the average of the half
maps (RELION's from their sum: RELION's is twice as large, the same map otherwise), and the
random phases are Hermitian (``fsc_correction``: statistically RELION's, not digit for digit).

Volumes are float arrays ``v[z, y, x]`` with a cubic box N; shell k lies at k / (N * pixel
size) 1/A. Each sphere costs four forward and one inverse FFT of the whole box (as RELION):
a loop over spheres, each a whole-array computation.
"""

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import scipy.fft

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import fft_workers, shell_index
from prime_plugin.core.fsc_correction import (CORRECTION_START_OFFSET, RESOLUTION_THRESHOLD, _beyond,
                                              _check_generator, _fourier_radius, _half_grid_fsc, _randomised)

__all__ = ["LocalResolution", "local_resolution", "sampling_centres", "sphere_mask", "LOCRES_SAMPLING_A",
           "LOCRES_RANDOMISE_AT_A", "LOCRES_MIN_RESOLUTION_A"]

LOCRES_SAMPLING_A = 25.0  # RELION's --locres_sampling
LOCRES_RANDOMISE_AT_A = 25.0  # RELION's --locres_randomize_at
LOCRES_MIN_RESOLUTION_A = 50.0  # RELION's --locres_minres
NO_CROSSING_A = 999.0  # RELION's resolution of a sphere whose FSC drops below 0.143 at shell 1
FILTER_EDGE_SHELLS = 2  # RELION's --filter_edge_width


@dataclass
class LocalResolution:
    """What :func:`local_resolution` finds.

    resolution_A : float32 (N, N, N), local resolution in Angstrom (0 where no sphere reaches).
    filtered : float32 (N, N, N), the map filtered to the local resolution (0 where no sphere reaches).
    centres_px : int (n, 3), the spheres' centres [z, y, x] in voxels from the box centre N // 2.
    sphere_resolution_A : float64 (n,), each sphere's resolution (A).
    randomise_from_shell : int, the shell k the phases were randomised from.
    radius_px, edge_px, step_px : int, the sphere's radius, edge width and the grid step in voxels.
    """

    resolution_A: np.ndarray
    filtered: np.ndarray
    centres_px: np.ndarray
    sphere_resolution_A: np.ndarray
    randomise_from_shell: int
    radius_px: int
    edge_px: int
    step_px: int


def _round(value):
    """RELION's ROUND: the nearest integer, halves away from zero."""
    return int(np.floor(value + 0.5)) if value >= 0 else -int(np.floor(-value + 0.5))


def sampling_centres(box: int, step_px: int, radius_px: int) -> np.ndarray:
    """Sphere centres [z, y, x] (voxels from the box centre, int (n, 3)): every ``step_px`` from -box // 2,
    closer than box // 2 - radius_px to the centre (RELION's grid)."""
    axis = np.arange(-(box // 2), box - box // 2, step_px)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid[np.sqrt((grid.astype(np.float64) ** 2).sum(axis=1)) < box // 2 - radius_px]


def sphere_mask(box: int, centre_px, radius_px: float, edge_px: float) -> np.ndarray:
    """Soft sphere, float64 (N, N, N): 1 within ``radius_px`` of ``centre_px`` ([z, y, x] from the box
    centre), 0.5 + 0.5 cos(pi (d - radius) / edge) over the next ``edge_px`` voxels, 0 beyond (not periodic)."""
    axis = np.arange(box) - box // 2
    dz, dy, dx = (axis - c for c in centre_px)
    distance = np.sqrt(dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2)
    if edge_px <= 0:
        return (distance <= radius_px).astype(np.float64)
    ramp = np.clip((distance - radius_px) / edge_px, 0.0, 1.0)
    return 0.5 + 0.5 * np.cos(np.pi * ramp)


def _corrected(masked, random, from_shell):
    """RELION's calculateFSCtrue: shell-0 values <= 0 set to 1, Chen's formula from ``from_shell + 2`` on."""
    masked, random = masked.copy(), random.copy()
    masked[0] = 1.0 if masked[0] <= 0 else masked[0]
    random[0] = 1.0 if random[0] <= 0 else random[0]
    out = masked.copy()
    start = from_shell + CORRECTION_START_OFFSET
    with np.errstate(invalid="ignore", divide="ignore"):
        out[start:] = (masked[start:] - random[start:]) / (1.0 - random[start:])
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _sphere_resolution(curve, box, pixel_size_A, min_resolution_A):
    """RELION's reading: N * pixel / i at the last shell i before the curve first drops below 0.143, capped."""
    below = np.nonzero(curve < RESOLUTION_THRESHOLD)[0]
    last = len(curve) - 1 if below.size == 0 else int(below[0]) - 1
    resolution = NO_CROSSING_A if last <= 0 else box * pixel_size_A / last
    return min(min_resolution_A, resolution)


def _weights_and_low_pass(curve, resolution_A, box, pixel_size_A, shells, radius):
    """sqrt(2 FSC / (1 + FSC)) per shell (RELION's applyFscWeighting) times RELION's raised-cosine low-pass
    at ``resolution_A`` (lowPassFilterMap), on the rfftn half grid, float64 (N, N, N // 2 + 1)."""
    below = np.nonzero(curve < 1e-4)[0]
    last = len(curve) - 1 if below.size == 0 else int(below[0]) - 1
    per_shell = np.zeros(box // 2 + 2)
    kept = np.clip(curve[:last + 1], 0.0, None)
    per_shell[:last + 1] = np.sqrt(2.0 * kept / (1.0 + kept))
    weights = per_shell[np.minimum(shells, box // 2 + 1)]
    cutoff = _round(box * pixel_size_A / resolution_A)
    half = FILTER_EDGE_SHELLS // 2
    low, high = max(0, cutoff - half), cutoff + half
    ramp = np.clip((radius - low) / (high - low), 0.0, 1.0)
    return weights * (0.5 + 0.5 * np.cos(np.pi * ramp))


def local_resolution(half1: np.ndarray, half2: np.ndarray, pixel_size_A: float, *,
                     sampling_A: float = LOCRES_SAMPLING_A, radius_A: Optional[float] = None,
                     edge_A: Optional[float] = None, randomise_at_A: float = LOCRES_RANDOMISE_AT_A,
                     min_resolution_A: float = LOCRES_MIN_RESOLUTION_A, bfactor_A2: float = 0.0,
                     mtf: Optional[np.ndarray] = None,
                     rng: Union[np.random.Generator, int, None] = None) -> LocalResolution:
    """Local resolution and locally filtered map of two half maps (relion_postprocess --locres; module docstring).

    Parameters
    ----------
    half1, half2 : ndarray, real, shape (N, N, N), order [z, y, x]
        The two independent, unmasked half maps (checked by the caller: same shape, finite).
    pixel_size_A : float
        Voxel size in Angstrom.
    sampling_A : float
        Spacing of the sphere centres in Angstrom (RELION's --locres_sampling, 25).
    radius_A, edge_A : float or None
        Radius and soft-edge width of the spheres in Angstrom (None: half the sampling, and the sampling).
    randomise_at_A : float
        Resolution in Angstrom from which the phases are randomised (--locres_randomize_at, 25).
    min_resolution_A : float
        Lowest local resolution reported, Angstrom (--locres_minres, 50).
    bfactor_A2 : float
        B-factor (A^2, negative sharpens) applied to the filtered map up to Nyquist.
    mtf : ndarray or None, float (N, N, N // 2 + 1)
        Detector MTF on the rfftn half grid that the filtered map is divided by (None: none).
    rng : numpy Generator, int or None
        Random phases (None: seed 0).

    Returns
    -------
    LocalResolution

    Raises
    ------
    PrimeInputError
        A non-positive sampling, radius or resolution; spheres that do not fit in the box
        (no centre left); a randomisation shell outside 1..N // 2.
    """
    for name, value in (("sampling_A", sampling_A), ("randomise_at_A", randomise_at_A),
                        ("min_resolution_A", min_resolution_A), ("radius_A", radius_A), ("edge_A", edge_A)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise PrimeInputError(f"{name} must be a positive number of Angstrom, got {value!r}", parameter=name)
    box = half1.shape[0]
    step = _round(sampling_A / pixel_size_A)
    radius = _round((0.5 * sampling_A if radius_A is None else radius_A) / pixel_size_A)
    edge = _round((sampling_A if edge_A is None else edge_A) / pixel_size_A)
    if step < 1:
        raise PrimeInputError(f"sampling_A {sampling_A:g} A is less than half a voxel ({pixel_size_A:g} A)",
                              parameter="sampling_A")
    from_shell = int(box * pixel_size_A / randomise_at_A)
    if not 1 <= from_shell <= box // 2:
        raise PrimeInputError(f"randomise_at_A {randomise_at_A:g} A lies outside the box's shells 1..{box // 2} "
                              f"(N x pixel size = {box * pixel_size_A:g} A)", parameter="randomise_at_A")
    centres = sampling_centres(box, step, radius)
    if len(centres) == 0:
        raise PrimeInputError(f"no sphere of radius {radius} px fits in the {box} px box; give a smaller radius_A",
                              parameter="radius_A")
    rng = _check_generator(rng)
    workers = fft_workers()
    shells = shell_index(box)
    radius_grid = _fourier_radius(box)
    half1 = np.asarray(half1, np.float64)
    half2 = np.asarray(half2, np.float64)
    beyond = _beyond(box, from_shell, "radius")
    random1 = _randomised(scipy.fft.rfftn(half1, workers=workers), beyond, rng, half1.shape)
    random2 = _randomised(scipy.fft.rfftn(half2, workers=workers), beyond, rng, half2.shape)
    maps = np.stack([half1, half2, random1, random2])  # (4, N, N, N)

    average = scipy.fft.rfftn((half1 + half2) / 2.0, workers=workers)
    s2 = (radius_grid / (box * pixel_size_A)) ** 2
    average *= np.where(radius_grid <= box / 2.0, np.exp(-0.25 * bfactor_A2 * s2), 0.0)
    if mtf is not None:
        average /= mtf

    filtered_sum = np.zeros(half1.shape)
    inverse_sum = np.zeros(half1.shape)
    weight_sum = np.zeros(half1.shape)
    resolutions = np.empty(len(centres))
    for n, centre in enumerate(centres):
        mask = sphere_mask(box, centre, radius, edge)
        spectra = scipy.fft.rfftn(maps * mask, axes=(1, 2, 3), workers=workers)
        curve = _corrected(_half_grid_fsc(spectra[0], spectra[1], shells),
                           _half_grid_fsc(spectra[2], spectra[3], shells), from_shell)
        resolutions[n] = _sphere_resolution(curve, box, pixel_size_A, min_resolution_A)
        local = scipy.fft.irfftn(average * _weights_and_low_pass(curve, resolutions[n], box, pixel_size_A, shells,
                                                                 radius_grid), s=half1.shape, workers=workers)
        filtered_sum += mask * local
        inverse_sum += mask / resolutions[n]
        weight_sum += mask
    covered = weight_sum > 0
    resolution_map = np.zeros(half1.shape, np.float32)
    resolution_map[covered] = weight_sum[covered] / inverse_sum[covered]
    filtered = np.zeros(half1.shape, np.float32)
    filtered[covered] = filtered_sum[covered] / weight_sum[covered]
    return LocalResolution(resolution_A=resolution_map, filtered=filtered, centres_px=centres,
                           sphere_resolution_A=resolutions, randomise_from_shell=from_shell, radius_px=radius,
                           edge_px=edge, step_px=step)
