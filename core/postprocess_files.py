"""Files of a post-processing run: the half maps and mask it reads, the maps, STAR file and plots it writes.

Inputs are checked together before anything is computed or written (one
:class:`PrimeInputError` naming the file and the problem). Outputs follow RELION's
PostProcess job: ``postprocess.mrc`` (sharpened), ``postprocess_masked.mrc`` (times the
mask) and ``postprocess.star`` with the blocks relion_postprocess 3.1 writes
(``data_general``, ``data_fsc``, ``data_guinier``, same labels in the same order), plus
``fsc.png`` and ``guinier.png``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pandas as pd

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.mrc import read_volume, write_volume
from prime_plugin.core.postprocess import Postprocessed
from prime_plugin.core.star import PIXEL_SIZE_TOLERANCE, write_star_blocks
from prime_plugin.core.validation import check_input_map

__all__ = ["PostprocessInputs", "read_postprocess_inputs", "other_half_name", "write_postprocess_outputs",
           "OUTPUT_NAMES", "LOCRES_NAMES"]

MASK_TOLERANCE = 1e-6  # RELION's: mask values within [-1e-6, 1 + 1e-6]
OUTPUT_NAMES = ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "fsc.png", "guinier.png")
LOCRES_NAMES = ("postprocess_locres.mrc", "postprocess_locres_filtered.mrc")  # RELION's names
RELION_ZERO_SHELL_RESOLUTION_A = 999.0  # what RELION writes for shell 0's resolution


@dataclass
class PostprocessInputs:
    """Half maps and mask, float32 (N, N, N) [z, y, x], with the pixel size (A) and warnings (one line each)."""

    half1: np.ndarray
    half2: np.ndarray
    mask: np.ndarray
    pixel_size_A: float
    warnings: Tuple[str, ...]


def other_half_name(path):
    """RELION's --i2 default: ``half1`` replaced by ``half2`` in the file name (or the reverse); None without either."""
    path = Path(path)
    name = path.name
    if "half1" in name:
        return path.with_name(name.replace("half1", "half2"))
    if "half2" in name:
        return path.with_name(name.replace("half2", "half1"))
    return None


def _same_size(a, b):
    return abs(a - b) <= PIXEL_SIZE_TOLERANCE * max(a, b)


def read_postprocess_inputs(half1_path, half2_path, mask_path, pixel_size_A: Optional[float] = None
                            ) -> PostprocessInputs:
    """Read and check two half maps and a mask.

    The pixel size is ``pixel_size_A`` when given (A; it overrides the headers, as
    RELION's --angpix), else half map 1's header. Refused, naming the file: a missing or
    unreadable file, maps of other boxes, half maps whose headers give different pixel
    sizes, no pixel size anywhere, a blank half map, mask values outside [0, 1] or a
    mask without any voxel above 0.5. A mask whose header pixel size differs gives a warning.
    """
    half1, apix1 = read_volume(half1_path)
    half2, apix2 = read_volume(half2_path)
    mask, apix_mask = read_volume(mask_path)
    box = half1.shape[0]
    if half2.shape != half1.shape:
        raise PrimeInputError(f"box {half2.shape[0]} differs from half map 1's {box} ({half1_path})", half2_path)
    if apix1 > 0 and apix2 > 0 and not _same_size(apix1, apix2):
        raise PrimeInputError(f"pixel size {apix2:g} A in the header differs from half map 1's {apix1:g} A "
                              f"({half1_path})", half2_path)
    if mask.shape != half1.shape:
        raise PrimeInputError(f"mask box {mask.shape[0]} differs from the half maps' {box}", mask_path)
    low, high = float(mask.min()), float(mask.max())
    if low < -MASK_TOLERANCE or high > 1 + MASK_TOLERANCE:
        raise PrimeInputError(f"mask values must lie in [0, 1] (1 = particle), found [{low:g}, {high:g}]", mask_path)
    if not (mask > 0.5).any():
        raise PrimeInputError("the mask has no voxel above 0.5: it masks the whole particle away", mask_path)
    check_input_map(half1, half1_path, "half map")
    check_input_map(half2, half2_path, "half map")
    if np.array_equal(half1, half2):
        raise PrimeInputError(f"is the same map as half map 1 ({half1_path}); give two independent half maps",
                              half2_path)
    if pixel_size_A is None:
        pixel_size_A = apix1 if apix1 > 0 else apix2
        if not pixel_size_A > 0:
            raise PrimeInputError("the header gives no pixel size; give pixel_size_A", half1_path,
                                  parameter="pixel_size_A")
    elif not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise PrimeInputError(f"pixel_size_A must be a positive number of Angstrom, got {pixel_size_A!r}",
                              parameter="pixel_size_A")
    warnings = []
    if apix_mask > 0 and not _same_size(apix_mask, pixel_size_A):
        warnings.append(f"{mask_path}: the mask's header says {apix_mask:g} A/px, the half maps {pixel_size_A:g} "
                        "A/px; the mask is used voxel for voxel")
    return PostprocessInputs(half1=half1, half2=half2, mask=mask, pixel_size_A=float(pixel_size_A),
                             warnings=tuple(warnings))


def _general_block(result, half1_name, half2_name, mask_name):
    general = {
        "rlnFinalResolution": float(result.resolution_A),
        "rlnBfactorUsedForSharpening": float(result.bfactor_A2),
        "rlnUnfilteredMapHalf1": str(half1_name),
        "rlnUnfilteredMapHalf2": str(half2_name),
        "rlnParticleBoxFractionSolventMask": float(result.particle_fraction),
        "rlnMaskName": str(mask_name),
        "rlnRandomiseFrom": float(result.fsc.randomise_from_A),
    }
    if result.fit is not None:
        general.update(rlnFittedSlopeGuinierPlot=result.fit.slope, rlnFittedInterceptGuinierPlot=result.fit.intercept,
                       rlnCorrelationFitGuinierPlot=result.fit.correlation)
    return general


def _fsc_block(result):
    curves = result.fsc
    box = result.sharpened.shape[0]
    shells = np.arange(len(result.final_fsc))
    resolution_A = np.full(len(shells), RELION_ZERO_SHELL_RESOLUTION_A)
    resolution_A[1:] = box * result.pixel_size_A / shells[1:]
    masked = curves.masked.copy()
    randomised = curves.randomised_masked.copy()
    masked[0] = 1.0 if masked[0] <= 0 else masked[0]  # RELION's shell-0 rule
    randomised[0] = 1.0 if randomised[0] <= 0 else randomised[0]
    return pd.DataFrame({
        "rlnSpectralIndex": shells,
        "rlnResolution": 1.0 / resolution_A,
        "rlnAngstromResolution": resolution_A,
        "rlnFourierShellCorrelationCorrected": result.final_fsc,
        "rlnFourierShellCorrelationParticleMaskFraction": result.fsc_particle_fraction,
        "rlnFourierShellCorrelationUnmaskedMaps": curves.unmasked,
        "rlnFourierShellCorrelationMaskedMaps": masked,
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": randomised,
    })


def _guinier_block(result):
    g = result.guinier
    columns = {"rlnResolutionSquared": g.resolution_squared, "rlnLogAmplitudesOriginal": g.original,
               "rlnLogAmplitudesWeighted": g.weighted}
    if result.fit is not None or result.bfactor_A2 != 0:
        columns["rlnLogAmplitudesSharpened"] = g.sharpened
    if result.fit is not None:
        columns["rlnLogAmplitudesIntercept"] = np.full(len(g.original), result.fit.intercept)
    return pd.DataFrame(columns)


def write_postprocess_outputs(folder, result: Postprocessed, half1_name, half2_name, mask_name, local=None):
    """Write OUTPUT_NAMES into ``folder`` (made if missing), each file atomically; returns their paths.

    ``half1_name``, ``half2_name``, ``mask_name``: the names written into postprocess.star
    (RELION writes them as given on its command line). ``local``: a
    ``local_resolution.LocalResolution``, written as LOCRES_NAMES too, or None.
    """
    from prime_plugin.core import report

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in OUTPUT_NAMES]
    write_volume(paths[0], result.sharpened, result.pixel_size_A)
    write_volume(paths[1], result.masked, result.pixel_size_A)
    write_star_blocks({"general": _general_block(result, half1_name, half2_name, mask_name),
                       "fsc": _fsc_block(result), "guinier": _guinier_block(result)}, paths[2])
    curves = result.fsc
    plotted = {"corrected": result.final_fsc, "unmasked": curves.unmasked, "masked": curves.masked,
               "phase-randomised masked": curves.randomised_masked}
    report.postprocess_fsc_plot(paths[3], plotted, result.sharpened.shape[0], result.pixel_size_A, result.resolution_A)
    report.guinier_plot(paths[4], result.guinier, result.fit, result.bfactor_A2)
    if local is not None:
        paths += [folder / name for name in LOCRES_NAMES]
        write_volume(paths[-2], local.resolution_A, result.pixel_size_A)
        write_volume(paths[-1], local.filtered, result.pixel_size_A)
    return paths
