"""Every input checked before anything is written, in one place.

Shared by ``prime refine``, ``prime reconstruct``, ``prime convert-star`` and by ``prime
check`` (which runs them all and reports what the other commands would do), and by
Python callers. Each check raises :class:`~prime_plugin.core.errors.PrimeInputError`
with one line naming the file (or the parameter), and the column, row and value at fault:

- numbers (:func:`check_particle_values`): every value the engine reads from a STAR file
  is finite and within its physical range (:data:`RANGES`: voltage, Cs, amplitude
  contrast, pixel size, defocus, angles...); origins lie within the image
  (:func:`check_origins`).
- images (:func:`scan_images`): every particle's image is read once, in chunks of a
  bounded size, memory-mapped: no NaN or infinite pixel, no blank (constant) image.
- maps: a reference or mask holds signal (:func:`check_input_map`); a map about to be
  written is neither all zeros nor NaN (:func:`check_result_map`, a
  :class:`~prime_plugin.core.errors.PrimeRunError`: that is the engine's fault, not the input's).
- parameters (:func:`check_finite_parameters`): every number is finite.
- outputs (:func:`check_output_folder`, :func:`check_output_file`): writable, before the run.
- memory: :mod:`~prime_plugin.core.memory`, used here for a reference that must be resampled.
"""

import os
import tempfile
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np

from prime_plugin.core import memory
from prime_plugin.core.errors import PrimeInputError, PrimeRunError

__all__ = ["RANGES", "check_particle_values", "check_origins", "scan_images", "check_input_map", "check_result_map",
           "check_finite_parameters", "check_output_folder", "check_output_file", "open_particles", "ParticleData",
           "reference_for", "ReferencePlan"]

# Column -> (lowest, highest, unit): physical ranges, generous (a value outside is an error in the file).
_ANGLE = (-720.0, 720.0, "deg")
_DEFOCUS = (-200000.0, 200000.0, "A")  # +-20 um
RANGES = {
    "rlnVoltage": (10.0, 1000.0, "kV"),
    "rlnSphericalAberration": (0.0, 20.0, "mm"),
    "rlnAmplitudeContrast": (0.0, 1.0, ""),
    "rlnImagePixelSize": (0.01, 100.0, "A"),
    "rlnImageSize": (1.0, 65536.0, "px"),
    "rlnDefocusU": _DEFOCUS,
    "rlnDefocusV": _DEFOCUS,
    "rlnDefocusAngle": _ANGLE,
    "rlnPhaseShift": _ANGLE,
    "rlnCtfBfactor": (-1000.0, 1000.0, "A^2"),
    "rlnCtfScalefactor": (1e-3, 100.0, ""),
    "rlnAngleRot": _ANGLE,
    "rlnAngleTilt": _ANGLE,
    "rlnAnglePsi": _ANGLE,
    "rlnOriginXAngst": (-np.inf, np.inf, "A"),  # finite; within the image: check_origins
    "rlnOriginYAngst": (-np.inf, np.inf, "A"),
}
SCAN_CHUNK_BYTES = 8 << 20  # images read at a time by scan_images (small: the peak stays flat)


def _row_label(table, block, row):
    """Where row ``row`` (0-based) of ``block`` ("optics" or "particles") came from in the file."""
    if table.converted_from_30:  # RELION 3.0: one table; an optics row stands for its first particle
        if block == "optics":
            group = table.optics["rlnOpticsGroup"].iloc[row]
            row = int(np.flatnonzero(table.particles["rlnOpticsGroup"].to_numpy() == group)[0])
        return f"row {row + 1}"
    return f"data_{block} row {row + 1}"


def check_particle_values(table):
    """Refuse a value outside :data:`RANGES` (NaN and infinities included) in ``table``
    (a :class:`~prime_plugin.core.star.ParticleTable`), naming the column, the row and the value."""
    for block, frame in (("optics", table.optics), ("particles", table.particles)):
        for column in RANGES.keys() & set(frame.columns):
            low, high, unit = RANGES[column]
            values = frame[column].to_numpy(dtype=np.float64)
            bad = np.flatnonzero(~(np.isfinite(values) & (values >= low) & (values <= high)))
            if bad.size:
                value = values[bad[0]]
                expected = ("not a finite number" if not np.isfinite(value) or not np.isfinite(high)
                            else f"outside {low:g}..{high:g}{' ' + unit if unit else ''}")
                if table.converted_from_30 and column.endswith("Angst"):  # the file's origins are in pixels
                    column, value, unit = column[:-len("Angst")], value / table.pixel_size_A[bad[0]], "px"
                raise PrimeInputError(f"{_row_label(table, block, bad[0])}: {column} is {value:g}"
                                      f"{' ' + unit if unit else ''}, {expected}", table.source)
    if "rlnImageSize" in table.optics.columns:  # the box the file declares (the stacks' is checked with them)
        check_origins(table, table.optics_value("rlnImageSize").astype(np.float64))


def check_origins(table, box):
    """Refuse an origin that puts the particle's centre outside its image of ``box`` px (a number, or
    one per particle)."""
    box = np.broadcast_to(np.asarray(box, np.float64), (len(table),))
    bad = np.flatnonzero(~(np.abs(table.shifts_px) <= box[:, None] / 2).all(axis=1))
    if bad.size:
        row = bad[0]
        x, y = table.shifts_A[row]
        side = int(box[row])
        raise PrimeInputError(f"{_row_label(table, 'particles', row)}: the origin ({x:g}, {y:g}) A puts the "
                              f"particle's centre outside its {side} px image (at most {side // 2} px = "
                              f"{side / 2 * table.pixel_size_A[row]:g} A from the centre)", table.source)


def scan_images(images, chunk_bytes=SCAN_CHUNK_BYTES):
    """Read every image of ``images`` (a ParticleImages) once, in chunks; refuse NaN or infinite
    pixels and blank (constant) images, naming the stack and the image."""
    per_chunk = max(1, chunk_bytes // (images.box * images.box * 4))
    for rows, chunk in images.chunks(per_chunk):  # read() refuses NaN and infinite pixels
        flat = chunk.reshape(len(chunk), -1)
        blank = flat.min(axis=1) == flat.max(axis=1)
        if blank.any():
            k = int(np.argmax(blank))
            row = rows[k]
            raise PrimeInputError(f"image {images.index_in_stack[row] + 1} is blank (every pixel {flat[k, 0]:g}): "
                                  "no particle to use", images.stack_paths[images.stack_id[row]])


def check_input_map(volume, path, what="map"):
    """Refuse a map without signal (every voxel the same value); ``what`` names it in the message."""
    if volume.size and volume.min() == volume.max():
        raise PrimeInputError(f"the {what} is blank (every voxel {float(volume.flat[0]):g}): it holds no signal", path)


def check_result_map(volume, what):
    """Refuse to write a map of NaN, infinities or zeros (:class:`PrimeRunError`, nothing written)."""
    if not np.isfinite(volume).all():
        raise PrimeRunError(f"{what} holds NaN or infinite values: nothing written")
    if not np.any(volume):
        raise PrimeRunError(f"{what} is all zeros (no particle contributed): nothing written")


def check_finite_parameters(params):
    """Refuse a NaN or infinite number in the fields of dataclass ``params`` (in the field's name)."""
    for field in fields(params) if is_dataclass(params) else ():
        value = getattr(params, field.name)
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            raise PrimeInputError(f"{field.name} must be a finite number, got {value}", parameter=field.name)


def _probe_writable(folder, path):
    try:
        handle, name = tempfile.mkstemp(prefix=".prime-write-test.", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise PrimeInputError(f"cannot write in {folder} ({error.strerror or error})", path) from None


def check_output_folder(path):
    """Refuse an output folder that cannot be made or written in (nothing is left behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrimeInputError("is a file, not a folder", path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PrimeInputError(f"cannot make the output folder: {existing} is a file", path)
    _probe_writable(existing, path)


def check_output_file(path):
    """Refuse an output file whose folder is missing or not writable, or that names a folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise PrimeInputError("is a folder; give a file name", path)
    if folder.exists() and not folder.is_dir():
        raise PrimeInputError(f"{folder} is a file, not a folder", path)
    if not folder.is_dir():
        raise PrimeInputError("No such file or directory: the output folder must exist", path)
    _probe_writable(folder, path)


@dataclass
class ParticleData:
    """A checked particle data set: the table, its images (not scanned yet unless asked), the pixel size (A)."""

    table: object
    images: object
    pixel_size_A: float


def open_particles(path, pixel_size_A=None, scan=True):
    """Read and check a particle STAR file and its images: numbers, pixel size, stacks, origins and
    (``scan``) every pixel. Returns :class:`ParticleData`; raises PrimeInputError on the first problem."""
    from prime_plugin.core.images import ParticleImages
    from prime_plugin.core.star import common_pixel_size, read_particles

    table = read_particles(path, pixel_size_A=pixel_size_A)
    check_particle_values(table)
    apix = common_pixel_size(table, pixel_size_A, path)
    images = ParticleImages(table)
    check_origins(table, images.box)
    if scan:
        scan_images(images)
    return ParticleData(table, images, apix)


@dataclass
class ReferencePlan:
    """How a reference map meets the particles: volume float32 (n, n, n) as read, its voxel size (A; the
    particles' when the header gives none), whether it must be resampled, and a note for the log or None."""

    volume: np.ndarray
    pixel_size_A: float
    resample: bool
    note: str = None


def reference_for(path, box, pixel_size_A, available=None):
    """Read and check a reference for particles of ``box`` px at ``pixel_size_A``: signal, a pixel size
    to resample from, a reachable sampling and the memory resampling needs. Returns ReferencePlan."""
    from prime_plugin.core.mrc import read_volume
    from prime_plugin.core.resample import fourier_resampled_box

    volume, ref_apix = read_volume(path)
    ref_box, note = volume.shape[0], None
    if not ref_apix > 0:
        if ref_box != box:
            raise PrimeInputError(f"map box {ref_box} differs from the particles' box {box} and the header gives no "
                                  "pixel size: cannot tell how to resample it (set its pixel size)", path)
        note = f"{path}: no pixel size in the header, taking the particles' {pixel_size_A:g} A."
        ref_apix = pixel_size_A
    check_input_map(volume, path, "reference")
    resample = abs(ref_apix - pixel_size_A) > 1e-3 * pixel_size_A or ref_box != box
    if resample:
        achieved = ref_box * ref_apix / fourier_resampled_box(ref_box, ref_apix, pixel_size_A)
        if abs(achieved - pixel_size_A) > 1e-2 * pixel_size_A:
            raise PrimeInputError(f"cannot resample the reference ({ref_apix:g} A) to {pixel_size_A:g} A: "
                                  f"the nearest is {achieved:g} A", path)
        memory.require({"resampling": memory.resample_bytes(ref_box, ref_apix, pixel_size_A)},
                       f"resampling the reference from {ref_apix:g} A/px ({ref_box} px) to the particles' "
                       f"{pixel_size_A:g} A/px", "check the pixel size in its header, or resample it to the "
                       "particles' pixel size and box beforehand (e.g. relion_image_handler --rescale_angpix "
                       "--new_box)", path=path, available=available)
    return ReferencePlan(volume, ref_apix, resample, note)
