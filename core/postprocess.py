"""Post-processing of two half maps, as relion_postprocess (RELION 3.1) does it.

From two independent half maps, a solvent mask and a pixel size:

1. FSC of the unmasked and the masked half maps, of the masked half maps with random
   phases, and the mask-corrected FSC (``fsc_correction.corrected_fsc``, which follows
   RELION); the final resolution is where the corrected FSC drops below 0.143.
   As RELION (unless ``force_mask``), when the unmasked FSC stays above 0.143 for more
   shells than the corrected one, the unmasked curve and resolution are used instead
   and a warning says so; a warning also says when the randomised FSC exceeds 0.1 at
   the resolution (the mask's edge is too sharp).
2. The average of the two half maps (unmasked), its Fourier amplitudes weighted by
   sqrt(2 FSC / (1 + FSC)) per shell (Rosenthal & Henderson 2003), from the final FSC;
   RELION's rule: zero from the first shell where the FSC drops below 1e-4 on.
3. Guinier analysis: ln of the shell-averaged amplitude against 1/d^2 (1/A^2). With
   ``bfactor="auto"``, a least-squares straight line through the FSC-weighted curve
   over the shells from ``autob_lowres_A`` (10 A, RELION's --autob_lowres) to
   ``autob_highres_A`` (the final resolution by default) gives B = 4 x slope (A^2),
   RELION's --auto_bfac. Or an ad hoc B (RELION's --adhoc_bfac; 0 leaves the map unsharpened).
4. Sharpening by exp(-B s^2 / 4) up to Nyquist (s in 1/A), then a low-pass filter at
   the final resolution (or ``low_pass_A``) with RELION's raised cosine two shells wide
   (``fourier.shell_low_pass``); the masked map is that map times the mask.

Conventions shared with relion_postprocess, so that postprocess.star reads the same:
Fourier transforms normalised by N^3 (RELION's forward transform) for the Guinier
values; shell k at k / (N * pixel size) 1/A, shells 0..N // 2, rounded radius;
ln amplitude -99 for a shell whose amplitudes are all 0; the cisTEM-like "particle
fraction" FSC, f FSC / (1 + (f - 1) FSC) with f = 0.476 / (fraction of the box where the mask
> 0.5). Where this module differs on purpose: the final resolution is interpolated
between shells (``fourier.resolution_at``), RELION gives the last shell above 0.143;
RELION (3.1 and 4.0) fits the B-factor up to Nyquist by default (--autob_highres 0;
the FSC weighting then leaves out only the shells past the first FSC below 1e-4) and
low-pass filters only when asked (--low_pass); here the fit and the filter stop at the
final resolution by default, so that shells of little signal do not steer B.
``autob_highres_A=0`` and ``low_pass_A=0`` give RELION's defaults.

Volumes are float arrays ``v[z, y, x]`` with a cubic box N.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import numpy as np
import scipy.fft

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import fft_workers, shell_index, shell_low_pass
from prime_plugin.core.fsc_correction import RESOLUTION_THRESHOLD, CorrectedFsc, corrected_fsc

__all__ = ["AUTOB_LOWRES_A", "GuinierPlot", "BfactorFit", "Postprocessed", "postprocess", "guinier_plot",
           "fit_bfactor", "fsc_weights", "last_shell_above", "particle_fraction"]

AUTOB_LOWRES_A = 10.0  # RELION's --autob_lowres default
FSC_WEIGHT_FLOOR = 1e-4  # RELION: no weight from the first shell whose FSC is below this on
LN_OF_ZERO = -99.0  # RELION's ln amplitude of an empty shell
RANDOMISED_FSC_WARNING = 0.1
PROTEIN_FRACTION = 0.476  # RELION's (and cisTEM's) constant of the particle-fraction FSC


@dataclass
class GuinierPlot:
    """ln of the mean Fourier amplitude per shell (shells 0..N // 2, float64 (N // 2 + 1,)).

    ``resolution_squared``: 1/d^2 in 1/A^2. ``original``: the average map;
    ``weighted``: after FSC weighting; ``sharpened``: after the B-factor too (before the
    low-pass filter). -99 where a shell's amplitudes are all zero, as RELION writes.
    """

    resolution_squared: np.ndarray
    original: np.ndarray
    weighted: np.ndarray
    sharpened: np.ndarray


@dataclass
class BfactorFit:
    """The straight line ln A = intercept + slope / d^2 through the FSC-weighted Guinier curve.

    slope in A^2 (B = 4 x slope), intercept dimensionless, correlation = r^2 (RELION's);
    the fit used the ``n_shells`` shells with resolution in [highres_A, lowres_A] (A).
    """

    slope: float
    intercept: float
    correlation: float
    lowres_A: float
    highres_A: float
    n_shells: int


@dataclass
class Postprocessed:
    """What :func:`postprocess` finds and makes.

    fsc : the four FSC curves and their resolutions (``fsc_correction.CorrectedFsc``).
    final_fsc : float64 (N // 2 + 1,), the curve the resolution, the weighting and the STAR's
        rlnFourierShellCorrelationCorrected come from (the corrected one, or the unmasked one
        when ``used_unmasked``).
    resolution_A : final resolution, FSC = 0.143 (interpolated), Angstrom.
    bfactor_A2 : B-factor applied (A^2; negative sharpens), fitted or given.
    fit : the Guinier fit, None for an ad hoc B-factor.
    low_pass_A : resolution of the low-pass filter applied (A), None when none was.
    particle_fraction : f of the particle-fraction FSC; fsc_particle_fraction the curve.
    sharpened, masked : float32 (N, N, N) maps, the second times the mask.
    warnings : one line each.
    """

    fsc: CorrectedFsc
    final_fsc: np.ndarray
    used_unmasked: bool
    resolution_A: float
    pixel_size_A: float
    bfactor_A2: float
    fit: Optional[BfactorFit]
    low_pass_A: Optional[float]
    guinier: GuinierPlot
    particle_fraction: float
    fsc_particle_fraction: np.ndarray
    sharpened: np.ndarray
    masked: np.ndarray
    warnings: Tuple[str, ...] = field(default_factory=tuple)


def last_shell_above(curve, threshold=RESOLUTION_THRESHOLD):
    """RELION's reading of an FSC curve: the last shell before it first drops below ``threshold``
    (0 if shell 0 does)."""
    below = np.nonzero(np.asarray(curve) < threshold)[0]
    return len(curve) - 1 if below.size == 0 else max(int(below[0]) - 1, 0)


def _shell_resolution_A(box, pixel_size_A):
    """Resolution of shells 0..N // 2 in A (shell 0: infinite), float64 (N // 2 + 1,)."""
    with np.errstate(divide="ignore"):
        return box * pixel_size_A / np.arange(box // 2 + 1, dtype=np.float64)


def guinier_plot(spectrum: np.ndarray, box: int, pixel_size_A: float) -> Tuple[np.ndarray, np.ndarray]:
    """1/d^2 (1/A^2) and ln of the mean amplitude of shells 0..N // 2 of an rfftn half grid.

    ``spectrum``: complex (N, N, N // 2 + 1), unnormalised (numpy's rfftn); it is divided
    by N^3 here, as RELION's transforms are. Every half-grid element counts once (RELION).
    ln is -99 for a shell whose amplitudes are all 0.
    """
    shells = shell_index(box)
    n = box // 2 + 1
    keep = shells < n
    total = np.bincount(shells[keep], weights=np.abs(spectrum[keep]), minlength=n) / float(box) ** 3
    count = np.bincount(shells[keep], minlength=n)
    mean = total / np.maximum(count, 1)
    with np.errstate(divide="ignore"):
        ln = np.where(mean > 0, np.log(np.where(mean > 0, mean, 1.0)), LN_OF_ZERO)
    resolution_squared = (np.arange(n) / (box * pixel_size_A)) ** 2
    return resolution_squared, ln


def fit_bfactor(resolution_squared: np.ndarray, ln_amplitude: np.ndarray, lowres_A: float,
                highres_A: float) -> BfactorFit:
    """Least-squares line through the Guinier points with resolution in [highres_A, lowres_A] (A).

    Points at -99 (empty shells) and shell 0 are left out, as RELION leaves them out.
    B = 4 x slope is the B-factor that flattens the curve (negative for a map that falls off).

    Raises
    ------
    PrimeInputError
        Fewer than two shells in the range (the map's resolution does not reach past
        ``lowres_A``, or the range is empty).
    """
    x = np.asarray(resolution_squared, np.float64)
    y = np.asarray(ln_amplitude, np.float64)
    with np.errstate(divide="ignore"):
        resolution = np.where(x > 0, 1.0 / np.sqrt(np.where(x > 0, x, 1.0)), np.inf)
    use = (resolution <= lowres_A) & (resolution >= highres_A) & (y > LN_OF_ZERO)
    if use.sum() < 2:
        raise PrimeInputError(f"the B-factor fit needs at least 2 Fourier shells between {lowres_A:g} A and "
                              f"{highres_A:g} A, found {int(use.sum())}: the map does not reach far enough past "
                              f"autob_lowres_A; give an ad hoc B-factor or a lower autob_lowres_A",
                              parameter="autob_lowres_A")
    xs, ys = x[use], y[use]
    dx, dy = xs - xs.mean(), ys - ys.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    intercept = float(ys.mean() - slope * xs.mean())
    denominator = (dx * dx).sum() * (dy * dy).sum()
    correlation = float((dx * dy).sum() ** 2 / denominator) if denominator > 0 else 1.0
    return BfactorFit(slope=slope, intercept=intercept, correlation=correlation, lowres_A=float(lowres_A),
                      highres_A=float(highres_A), n_shells=int(use.sum()))


def fsc_weights(curve: np.ndarray) -> np.ndarray:
    """sqrt(2 FSC / (1 + FSC)) per shell, RELION's: 0 where FSC <= 0 and from the first shell below 1e-4 on.

    ``curve``: float (N // 2 + 1,), shell 0 first. Returns float64 of the same shape.
    """
    curve = np.asarray(curve, np.float64)
    below = np.nonzero(curve < FSC_WEIGHT_FLOOR)[0]
    last = len(curve) - 1 if below.size == 0 else max(int(below[0]) - 1, 0)
    positive = np.clip(curve, 0.0, None)
    weights = np.sqrt(2.0 * positive / (1.0 + positive))
    weights[last + 1:] = 0.0
    return weights


def particle_fraction(mask: np.ndarray) -> float:
    """RELION's f = 0.476 / (fraction of the box where the mask is > 0.5) (rlnParticleBoxFractionSolventMask)."""
    inside = float(np.count_nonzero(np.asarray(mask) > 0.5)) / np.asarray(mask).size
    return PROTEIN_FRACTION / inside if inside > 0 else 0.0


def _check_bfactor(bfactor):
    if isinstance(bfactor, str):
        if bfactor != "auto":
            raise PrimeInputError(f"bfactor must be 'auto' or a number of A^2, got {bfactor!r}", parameter="bfactor")
        return bfactor
    if isinstance(bfactor, bool) or not isinstance(bfactor, (int, float, np.number)) or not np.isfinite(bfactor):
        raise PrimeInputError(f"bfactor must be 'auto' or a finite number of A^2, got {bfactor!r}",
                              parameter="bfactor")
    return float(bfactor)


def _final_curve(result, force_mask):
    """RELION's choice between the corrected and the unmasked FSC, its shell-0 rule, and its warnings."""
    warnings = []
    corrected = result.corrected.copy()
    if corrected[0] <= 0:  # RELION: "sometimes FSC at origin becomes -1"; it sets the masked one to 1
        corrected[0] = 1.0
    shell = last_shell_above(corrected)
    if last_shell_above(result.unmasked) > shell:
        if not force_mask:
            warnings.append("the unmasked FSC extends beyond the mask-corrected FSC: the unmasked FSC and its "
                            "resolution are used (check the mask, or force it with force_mask)")
            return result.unmasked.copy(), result.res_unmasked_A, True, warnings
        warnings.append("the unmasked FSC extends beyond the mask-corrected FSC (the mask is used as forced)")
    elif result.randomised_masked[shell] > RANDOMISED_FSC_WARNING:
        warnings.append(f"the phase-randomised FSC is {result.randomised_masked[shell]:.2f} (> 0.10) at the "
                        "resolution: the mask's edge may be too sharp; a softer mask gives a safer estimate")
    return corrected, result.res_corrected_A, False, warnings


def _bfactor_filter(box, pixel_size_A, bfactor_A2):
    """exp(-B s^2 / 4) on the rfftn half grid up to Nyquist, 0 beyond (RELION's applyBFactorToMap)."""
    f = np.fft.fftfreq(box, 1.0 / box)
    fx = np.arange(box // 2 + 1)
    radius2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2  # Fourier pixels^2
    s2 = radius2 / (box * pixel_size_A) ** 2
    return np.where(radius2 <= (box / 2.0) ** 2, np.exp(-0.25 * bfactor_A2 * s2), 0.0)


def postprocess(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray, pixel_size_A: float, *,
                bfactor: Union[str, float] = "auto", autob_lowres_A: float = AUTOB_LOWRES_A,
                autob_highres_A: Optional[float] = None, low_pass_A: Optional[float] = None,
                force_mask: bool = False, rng: Union[np.random.Generator, int, None] = None) -> Postprocessed:
    """Mask-corrected resolution, FSC weighting, B-factor sharpening and low-pass filter of two half maps.

    Parameters
    ----------
    half1, half2 : ndarray, real, shape (N, N, N), order [z, y, x]
        The two independent, unmasked half maps.
    mask : ndarray, real, shape (N, N, N), values in [0, 1]
        Soft solvent mask (1 = particle).
    pixel_size_A : float
        Voxel size in Angstrom.
    bfactor : "auto" or float
        "auto": fit from the Guinier plot (RELION's --auto_bfac); a number: that B-factor
        in A^2 (negative sharpens; 0 applies none).
    autob_lowres_A, autob_highres_A : float
        Resolution range of the fit in Angstrom; the high end defaults to the final
        resolution, 0 reaches Nyquist (RELION 3.1's default).
    low_pass_A : float or None
        Low-pass filter resolution (A); None: the final resolution; 0: no filter.
    force_mask : bool
        Keep the corrected FSC even when the unmasked one reaches further (RELION's --force_mask).
    rng : numpy Generator, int or None
        Phases of the randomised maps (``corrected_fsc``; None means seed 0, as RELION's default seed).

    Returns
    -------
    Postprocessed

    Raises
    ------
    PrimeInputError
        Maps of different shapes, not cubic or not finite, a mask outside [0, 1], a
        pixel size <= 0, half maps whose FSC never drops below 0.8, a B-factor fit
        with fewer than two shells, a bad ``bfactor`` or resolution.
    """
    bfactor = _check_bfactor(bfactor)
    for name, value in (("autob_lowres_A", autob_lowres_A), ("autob_highres_A", autob_highres_A),
                        ("low_pass_A", low_pass_A)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise PrimeInputError(f"{name} must be a resolution >= 0 in Angstrom, got {value!r}", parameter=name)
    try:
        result = corrected_fsc(half1, half2, mask, pixel_size_A, rng=rng)
    except ValueError as error:  # shapes, mask values, pixel size, an FSC that never falls: the user's input
        raise PrimeInputError(f"{error}", parameter="pixel_size_A" if "pixel_size_A" in str(error) else None) \
            from None
    box = half1.shape[0]
    final_fsc, resolution_A, used_unmasked, warnings = _final_curve(result, force_mask)

    spectrum = scipy.fft.rfftn((np.asarray(half1, np.float64) + np.asarray(half2, np.float64)) / 2.0,
                               workers=fft_workers())
    shells = shell_index(box)
    weights = np.append(fsc_weights(final_fsc), 0.0)  # the corners beyond N // 2 get the 0 at the end
    x, original = guinier_plot(spectrum, box, pixel_size_A)
    spectrum *= weights[np.minimum(shells, box // 2 + 1)]
    weighted = guinier_plot(spectrum, box, pixel_size_A)[1]

    fit = None
    if bfactor == "auto":
        highres_A = resolution_A if autob_highres_A is None else autob_highres_A
        fit = fit_bfactor(x, weighted, autob_lowres_A, highres_A)
        bfactor = 4.0 * fit.slope
    if bfactor != 0:
        spectrum *= _bfactor_filter(box, pixel_size_A, bfactor)
    sharpened_curve = guinier_plot(spectrum, box, pixel_size_A)[1]
    sharpened = scipy.fft.irfftn(spectrum, s=half1.shape, workers=fft_workers())
    applied_low_pass = resolution_A if low_pass_A is None else (low_pass_A or None)
    if applied_low_pass is not None:
        sharpened = shell_low_pass(sharpened, applied_low_pass, pixel_size_A)
    sharpened = np.asarray(sharpened, np.float32)
    masked = (sharpened * np.asarray(mask, np.float32)).astype(np.float32)

    fraction = particle_fraction(mask)
    u = result.unmasked
    with np.errstate(invalid="ignore", divide="ignore"):
        part = np.nan_to_num(fraction * u / (1.0 + (fraction - 1.0) * u))
    return Postprocessed(fsc=result, final_fsc=final_fsc, used_unmasked=used_unmasked, resolution_A=float(resolution_A),
                         pixel_size_A=float(pixel_size_A), bfactor_A2=float(bfactor), fit=fit,
                         low_pass_A=None if applied_low_pass is None else float(applied_low_pass),
                         guinier=GuinierPlot(resolution_squared=x, original=original, weighted=weighted,
                                             sharpened=sharpened_curve),
                         particle_fraction=fraction, fsc_particle_fraction=part, sharpened=sharpened,
                         masked=masked, warnings=tuple(warnings))
