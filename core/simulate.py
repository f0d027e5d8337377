"""Simulated particle images of a map, written as a RELION 3.1 data set.

``simulate_particles`` projects a map with :class:`~.projector.FourierProjector`
at random orientations and shifts, optionally multiplies by RELION's CTF and adds
white Gaussian noise, and writes ``particles.mrcs`` and ``particles.star`` (every
image carries the parameters it was made with, in RELION's conventions: angles
in degrees, origins in Angstrom, defocus in Angstrom).

Random choices (:mod:`.random_poses`; one seeded numpy Generator for the
parameters, another for the noise):

- Orientations are uniform on SO(3). With a point group G, each matrix A is
  replaced by the mate ``A R.T`` (R in G) whose projection direction is the
  canonical one of :func:`.directions.canonical_mates`, so the angles lie in the
  asymmetric unit that the search uses (for a map with symmetry G the image is
  the same).
- Origins are uniform in a disc of radius ``max_shift_px`` pixels.
- Defocus U uniform in the given range, V = U times (1 - uniform[0, 0.1)),
  astigmatism angle uniform in [0, 180) degrees.
- rlnRandomSubset alternates 1, 2, 1, 2...

SNR: the mean (over particles) of each clean, CTF-modulated image's variance
over the whole box, divided by the noise variance. The noise has unit standard
deviation (like relion_preprocess output), so the clean images are scaled by
``sqrt(snr / mean_clean_variance)``, with ``mean_clean_variance`` measured on the
first min(n, 256) particles themselves (a pilot: exact for n <= 256, an
estimate otherwise). ``snr=None`` means no noise and no scaling.
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from prime_plugin.core import memory
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.validation import RANGES, check_output_folder

__all__ = ["simulate_particles", "SimulatedParticles", "PILOT_SIZE", "STACK_NAME", "STAR_NAME"]

PILOT_SIZE = 256  # particles measured to set the signal scale for an SNR
STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
_MAX_CROPPED_ENERGY = 0.01  # largest fraction of the map's squared density a smaller box may cut off
_CHUNK_FLOATS = 1 << 24  # at most this many pixels per chunk of images (64 MB as float32)


@dataclass(frozen=True)
class SimulatedParticles:
    """What :func:`simulate_particles` wrote.

    star_path, stack_path : Path; n : particles; box : pixels; pixel_size_A : Angstrom;
    signal_scale : factor applied to the clean images (1 without noise);
    mean_clean_variance : pilot estimate of the clean images' variance before scaling.
    """

    star_path: Path
    stack_path: Path
    n: int
    box: int
    pixel_size_A: float
    signal_scale: float
    mean_clean_variance: float


def _check_arguments(volume, pixel_size_A, n, box, snr, seed, max_shift_px, defocus_range_um, voltage_kV, cs_mm,
                     amplitude_contrast, chunk_size):
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise PrimeInputError(f"expected a cubic 3D map, got shape {volume.shape} (z, y, x)")
    if not np.isfinite(volume).all():
        raise PrimeInputError("map holds NaN or infinite voxels")
    if volume.size and volume.min() == volume.max():
        raise PrimeInputError(f"the map is blank (every voxel {float(volume.flat[0]):g}): nothing to project")
    if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise PrimeInputError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A!r}")
    if int(n) != n or n < 1:
        raise PrimeInputError(f"number of particles must be a whole number >= 1, got {n!r}")
    if int(box) != box or box < 8:
        raise PrimeInputError(f"box must be a whole number of pixels >= 8, got {box!r}")
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise PrimeInputError(f"SNR must be a positive number (or none for noise-free images), got {snr!r}")
    if not (np.isfinite(max_shift_px) and 0 <= max_shift_px <= box / 4):
        raise PrimeInputError(f"maximum shift must lie between 0 and a quarter of the box ({box / 4:g} px), "
                              f"got {max_shift_px!r} px")
    if defocus_range_um is not None:
        low, high = (float(d) for d in defocus_range_um)
        if not (np.isfinite(low) and np.isfinite(high) and 0 <= low <= high):
            raise PrimeInputError(f"defocus range must be MIN MAX micrometres with 0 <= MIN <= MAX, "
                                  f"got {low:g} {high:g}")
    optics = {"rlnVoltage": voltage_kV, "rlnSphericalAberration": cs_mm, "rlnAmplitudeContrast": amplitude_contrast}
    if not all(RANGES[c][0] <= value <= RANGES[c][1] for c, value in optics.items()):
        raise PrimeInputError("need voltage in {0:g}..{1:g} kV, Cs in {2:g}..{3:g} mm and amplitude contrast in "
                              "[0, 1], got {4!r} kV, {5!r} mm, {6!r}".format(
                                  *RANGES["rlnVoltage"][:2], *RANGES["rlnSphericalAberration"][:2], voltage_kV,
                                  cs_mm, amplitude_contrast))
    if int(seed) != seed or seed < 0:
        raise PrimeInputError(f"seed must be a whole number >= 0, got {seed!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise PrimeInputError(f"chunk size must be a whole number >= 1, got {chunk_size!r}")


def _check_box_holds_map(volume, box):
    """Refuse a box that would cut off more than 1% of the map's squared density."""
    from prime_plugin.core.resample import crop_or_pad

    if box >= volume.shape[0]:
        return
    energy = np.square(volume, dtype=np.float64)
    total = energy.sum()
    kept = np.square(crop_or_pad(volume, box), dtype=np.float64).sum()
    if total > 0 and (total - kept) > _MAX_CROPPED_ENERGY * total:
        raise PrimeInputError(f"box {box} px is smaller than needed: it cuts off {100 * (total - kept) / total:.1f}% "
                              f"of the map's squared density (map box {volume.shape[0]} px)")


def particle_tables(n, box, pixel_size_A, angles_deg, origins_px, defocus, voltage_kV, cs_mm, amplitude_contrast):
    """RELION 3.1 (optics, particles) DataFrames; ``defocus`` is (n, 3) U, V (A), angle (deg), or None."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [float(pixel_size_A)],
        "rlnImageSize": [int(box)], "rlnImageDimensionality": [2], "rlnVoltage": [float(voltage_kV)],
        "rlnSphericalAberration": [float(cs_mm)], "rlnAmplitudeContrast": [float(amplitude_contrast)],
    })
    columns = {
        "rlnImageName": [f"{i:06d}@{STACK_NAME}" for i in range(1, n + 1)],
        "rlnAngleRot": angles_deg[:, 0], "rlnAngleTilt": angles_deg[:, 1], "rlnAnglePsi": angles_deg[:, 2],
        "rlnOriginXAngst": origins_px[:, 0] * pixel_size_A, "rlnOriginYAngst": origins_px[:, 1] * pixel_size_A,
    }
    if defocus is not None:
        columns.update({"rlnDefocusU": defocus[:, 0], "rlnDefocusV": defocus[:, 1], "rlnDefocusAngle": defocus[:, 2],
                        "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n)})
    columns["rlnOpticsGroup"] = np.ones(n, dtype=np.int64)
    columns["rlnRandomSubset"] = np.arange(n, dtype=np.int64) % 2 + 1
    return optics, pd.DataFrame(columns)


def _clean_images(projector, particles, optics, start, stop):
    """Noise-free projections of rows [start, stop) of the particle table, float32 (c, box, box).

    The poses and CTFs are read back from the table (exactly as written to the STAR file).
    """
    from prime_plugin.core.ctf import CtfParams, ctf_image
    from prime_plugin.core.geometry import euler_to_matrix

    pixel_size_A = float(optics["rlnImagePixelSize"].iloc[0])
    rows = particles.iloc[start:stop]
    rotations = euler_to_matrix(rows["rlnAngleRot"].to_numpy(), rows["rlnAngleTilt"].to_numpy(),
                                rows["rlnAnglePsi"].to_numpy())
    shifts_px = rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64) / pixel_size_A
    ctf = None
    if "rlnDefocusU" in rows:
        merged = rows.assign(**{c: optics[c].iloc[0] for c in ("rlnVoltage", "rlnSphericalAberration",
                                                               "rlnAmplitudeContrast")})
        ctf = ctf_image(CtfParams.from_star(merged), projector.box, pixel_size_A, rfft=True)
    return projector.project(rotations, shifts_px, ctf)


def simulate_particles(volume, pixel_size_A, n, out_dir, box=None, snr=None, seed=0, symmetry="C1",
                       max_shift_px=0.0, defocus_range_um=None, voltage_kV=300.0, cs_mm=2.7,
                       amplitude_contrast=0.1, chunk_size=512, progress=None, overwrite=False):
    """Project ``volume`` at random poses and write ``particles.mrcs`` + ``particles.star`` in ``out_dir``.

    Parameters
    ----------
    volume : ndarray (N, N, N), [z, y, x]
        The map, centre at N // 2.
    pixel_size_A : float
        Its voxel size in Angstrom, also the images' pixel size.
    n : int
        Number of particles (>= 1).
    out_dir : str or Path
        Output folder (created if needed).
    box : int, optional
        Image side in pixels (>= 8); the map is cropped or zero-padded to it in
        real space around its centre. Default N. Refused when cropping would cut
        off more than 1% of the map's squared density.
    snr : float, optional
        Signal-to-noise ratio (see module docstring); None: noise-free images.
    seed : int
        Seed of the random parameters and noise.
    symmetry : str
        Point group; angles are written in its asymmetric unit.
    max_shift_px : float
        Radius in pixels of the disc of random origins (0 to box / 4).
    defocus_range_um : (float, float), optional
        Defocus U range in micrometres; None: no CTF (no CTF columns written).
    voltage_kV, cs_mm, amplitude_contrast : float
        Optics of the CTF, written to the optics table in every case.
    chunk_size : int
        Images computed and written at once (fewer for large boxes: at most
        2**24 pixels per chunk), which bounds the memory used.
    progress : callable, optional
        Called with the number of images just written after every chunk
        (e.g. ``tqdm(...).update``).
    overwrite : bool
        Replace a particles.star / particles.mrcs already in ``out_dir``.

    Returns
    -------
    SimulatedParticles

    Both files are written under temporary names and renamed at the end; on any
    error the temporary files are removed, so a failed run leaves nothing behind.
    """
    from prime_plugin.core.mrc_stack import write_particle_data_set
    from prime_plugin.core.projector import FourierProjector
    from prime_plugin.core.random_poses import random_defocus, random_orientations, random_origins_px
    from prime_plugin.core.resample import crop_or_pad
    from prime_plugin.core.symmetry import symmetry_operators

    volume = np.asarray(volume, dtype=np.float32)
    box = volume.shape[0] if box is None and volume.ndim == 3 else box
    _check_arguments(volume, float(pixel_size_A), n, box, snr, seed, float(max_shift_px), defocus_range_um,
                     voltage_kV, cs_mm, amplitude_contrast, chunk_size)
    n, box, pixel_size_A = int(n), int(box), float(pixel_size_A)
    operators = symmetry_operators(symmetry)
    _check_box_holds_map(volume, box)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrimeInputError("output folder is a file", out_dir)
    check_output_folder(out_dir)
    existing = [out_dir / name for name in (STAR_NAME, STACK_NAME) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise PrimeInputError(f"{existing[0].name} already exists (choose another folder, or overwrite: --overwrite)",
                              out_dir)

    parameter_seed, noise_seed = np.random.SeedSequence(int(seed)).spawn(2)
    rng = np.random.default_rng(parameter_seed)
    angles = random_orientations(n, rng, operators)
    origins = random_origins_px(n, rng, float(max_shift_px))
    defocus = None if defocus_range_um is None else random_defocus(n, rng, defocus_range_um)
    optics, particles = particle_tables(n, box, pixel_size_A, angles, origins, defocus, voltage_kV, cs_mm,
                                        amplitude_contrast)

    chunk = max(1, min(int(chunk_size), _CHUNK_FLOATS // (box * box)))
    memory.require(memory.simulate_bytes(max(box, volume.shape[0]), chunk), f"simulating images of box {box}",
                   "simulate a smaller box")
    projector = FourierProjector(crop_or_pad(volume, box) if box != volume.shape[0] else volume)
    clean = partial(_clean_images, projector, particles, optics)  # (start, stop) -> clean images
    scale, clean_variance = 1.0, float("nan")
    if snr is not None:
        clean_variance = _mean_clean_variance(clean, min(n, PILOT_SIZE), chunk)
        scale = float(np.sqrt(snr / clean_variance))
    noise_rng = np.random.default_rng(noise_seed)

    def images():
        for start in range(0, n, chunk):
            batch = clean(start, min(start + chunk, n))
            if snr is not None:
                batch *= np.float32(scale)
                batch += noise_rng.standard_normal(batch.shape, dtype=np.float32)
            yield batch

    write_particle_data_set(out_dir, STACK_NAME, STAR_NAME, images(), optics, particles, progress)
    return SimulatedParticles(out_dir / STAR_NAME, out_dir / STACK_NAME, n, box, pixel_size_A, scale, clean_variance)


def _mean_clean_variance(clean, pilot, chunk):
    """Mean over particles [0, pilot) of each clean image's variance over the box."""
    variances = [clean(s, min(s + chunk, pilot)).var(axis=(1, 2), dtype=np.float64) for s in range(0, pilot, chunk)]
    value = float(np.concatenate(variances).mean())
    if not value > 0:
        raise PrimeInputError("the map's projections are constant (empty map?): no signal to scale to an SNR")
    return value
