"""RELION STAR files: particle tables in, RELION 3.1 layout out.

Reading accepts RELION 3.0 particle files (one loop block, ``rlnOriginX/Y`` in
pixels, pixel size from ``rlnDetectorPixelSize`` (um) and ``rlnMagnification``)
and RELION 3.1+ files (``data_optics`` + ``data_particles``, ``rlnOriginXAngst/YAngst``).
Both become one :class:`ParticleTable` in the 3.1 layout, converted the way
``relion_convert_star`` converts (tested against it). Writing is always the 3.1
layout. The round trip is lossless: unknown columns, extra blocks, block order
and row order are kept, and floats are written in their shortest exact form.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from prime_plugin.core.atomic_files import write_text_atomically
from prime_plugin.core.errors import PrimeInputError

STAR_VERSION_LINE = "# version 30001"
PIXEL_SIZE_TOLERANCE = 1e-4  # relative: pixel sizes closer than this are the same

# Per-particle columns of a RELION 3.0 file that RELION 3.1 keeps in the optics table.
_OPTICS_COLUMNS_30 = ["rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage", "rlnBeamTiltX", "rlnBeamTiltY"]
_PIXEL_COLUMNS_30 = ["rlnMagnification", "rlnDetectorPixelSize"]


@dataclass
class ParticleTable:
    """Particles of one STAR file in the RELION 3.1 layout, with explicit units.

    Attributes
    ----------
    particles : pandas.DataFrame
        One row per particle in file order, RELION column names without the
        leading underscore (``rlnImageName``, ``rlnOriginXAngst``...). Columns the
        package does not know are kept as read.
    optics : pandas.DataFrame
        One row per optics group (``rlnOpticsGroup``, ``rlnImagePixelSize`` in A...).
    other_blocks : dict
        Every other block of the file, in file order (DataFrame for loops, dict
        for key-value blocks); written back after the particles.
    source : pathlib.Path or None
        The file it was read from (image names resolve relative to its folder).
    converted_from_30 : bool
        True when the file was in the RELION 3.0 layout.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame
    other_blocks: dict = field(default_factory=dict)
    source: Path = None
    converted_from_30: bool = False

    def __len__(self):
        return len(self.particles)

    def optics_value(self, column):
        """Per-particle values of optics-table ``column``, shape (n,)."""
        if column not in self.optics.columns:
            raise PrimeInputError(f"optics table has no {column} column", self.source)
        lookup = pd.Series(self.optics[column].to_numpy(), index=self.optics["rlnOpticsGroup"].to_numpy())
        return lookup.reindex(self.particles["rlnOpticsGroup"].to_numpy()).to_numpy()

    @property
    def pixel_size_A(self):
        """Pixel size of each particle image in Angstrom, float64 (n,)."""
        return self.optics_value("rlnImagePixelSize").astype(np.float64)

    @property
    def shifts_A(self):
        """RELION origins (rlnOriginXAngst, rlnOriginYAngst) in Angstrom, (n, 2); zeros if absent."""
        cols = ["rlnOriginXAngst", "rlnOriginYAngst"]
        if not set(cols) <= set(self.particles.columns):
            return np.zeros((len(self), 2))
        return self.particles[cols].to_numpy(dtype=np.float64)

    @property
    def shifts_px(self):
        """RELION origins in pixels of each particle's image, (n, 2)."""
        return self.shifts_A / self.pixel_size_A[:, None]

    @property
    def angles_deg(self):
        """(rot, tilt, psi) in degrees, (n, 3), or None when the file has no angles."""
        cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
        if not set(cols) <= set(self.particles.columns):
            return None
        return self.particles[cols].to_numpy(dtype=np.float64)

    def particles_with_optics(self):
        """The particle table with every optics column joined per particle (particle columns win).

        For computations that need optics values per particle (CTF voltage, Cs...).
        """
        extra = [c for c in self.optics.columns if c not in self.particles.columns]
        joined = self.particles.copy()
        for column in extra:
            joined[column] = self.optics_value(column)
        return joined

    def per_particle(self, column):
        """Values of ``column`` for each particle, from the particle or the optics table."""
        if column in self.particles.columns:
            return self.particles[column].to_numpy()
        return self.optics_value(column)


# ---------------------------------------------------------------- reading

def read_star_blocks(path):
    """All data blocks of a STAR file, in file order: name -> DataFrame or dict.

    Raises PrimeInputError naming the file if it is missing or not a STAR file.
    """
    path = Path(path)
    if not path.is_file():
        raise PrimeInputError("file not found", path)
    _check_looks_like_star(path)
    try:
        if _PANDAS_PARSES_FLOATS_EXACTLY:
            blocks = starfile.read(path, always_dict=True)
        else:
            blocks = starfile.read(path, always_dict=True, parse_as_string=_label_names(path))
    except Exception as exc:  # starfile/pandas raise many kinds on malformed text
        raise PrimeInputError(f"not a readable STAR file ({type(exc).__name__}: {exc})".splitlines()[0], path)
    if not blocks:
        raise PrimeInputError("no data blocks found: not a STAR file", path)
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            _check_loop_shape(block, name, path)
    if not _PANDAS_PARSES_FLOATS_EXACTLY:  # after the shape check: a column declared twice has no single dtype
        blocks = {name: _exact_numbers(block) for name, block in blocks.items()}
    return dict(blocks)


def _check_loop_shape(frame, name, path):
    """Refuse a loop with a column declared twice, or with rows short of values (a file cut off)."""
    twice = frame.columns[frame.columns.duplicated()]
    if len(twice):
        raise PrimeInputError(f"data_{name} declares the column {twice[0]} twice", path)
    last = frame.iloc[:, -1] if len(frame.columns) else pd.Series([], dtype=float)
    # A short row leaves NaN in the last column (or '' where the file is read as text, pandas < 3);
    # a literal 'nan' value looks the same, hence the look at the file itself.
    missing = last.isna() | (last.eq("") if last.dtype == object else False)
    if missing.any():
        short = _first_short_row(path, name)
        if short is not None:
            row, found = short
            raise PrimeInputError(f"data_{name} row {row} has {found} of {len(frame.columns)} values: the file is "
                                  "cut off or the row is incomplete", path)


def _first_short_row(path, name):
    """(1-based row, values found) of the first row of loop ``data_name`` with too few values, or None."""
    import shlex

    block, labels, row = None, 0, 0
    with open(path, errors="replace") as handle:
        for line in handle:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if text.startswith("data_"):
                block, labels, row = text[5:], 0, 0
            elif block != name or text == "loop_":
                continue
            elif text.startswith("_"):
                labels += 1
            elif labels:
                row += 1
                values = len(shlex.split(text, comments=True)) if '"' in text or "'" in text else len(text.split())
                if values < labels:
                    return row, values
    return None


# pandas < 3 parses CSV floats with a fast routine that can be one unit in the last place off
# (Scipion pins pandas 2); there every value is read as text and converted by Python's
# correctly rounded float(), so a written file reads back bit for bit under both.
_PANDAS_PARSES_FLOATS_EXACTLY = int(pd.__version__.split(".")[0]) >= 3


def _label_names(path):
    """Every label (``_rlnXxx`` without the underscore) declared in the STAR file."""
    names = set()
    with open(path, errors="replace") as handle:
        for line in handle:
            if line.startswith("_"):
                names.add(line[1:].split(None, 1)[0])
    return list(names)


def _exact_numbers(block):
    """A block read as text with its numeric values converted: integers, else floats, else text."""
    if isinstance(block, pd.DataFrame):
        return pd.DataFrame({column: _numeric_values(block[column]) for column in block.columns})
    return {key: _numeric_values(pd.Series([value])).iloc[0] for key, value in block.items()}


def _numeric_values(values):
    if values.dtype != object:
        return values
    for kind in (np.int64, np.float64):
        try:
            return values.astype(kind)
        except (ValueError, TypeError, OverflowError):
            continue
    return values


def _check_looks_like_star(path):
    """Refuse binary or text files without a ``data_`` line before handing them to the parser."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if b"\0" in head:
        raise PrimeInputError("binary file, not a STAR file", path)
    text = head.decode("utf-8", errors="replace")
    if not any(line.strip().startswith("data_") for line in text.splitlines()):
        raise PrimeInputError("no 'data_' block: not a STAR file", path)


# RELION columns the engine reads as numbers (a text value in them is refused, naming the row).
NUMERIC_COLUMNS = frozenset([
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst",
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
    "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnMagnification", "rlnDetectorPixelSize",
    "rlnImagePixelSize", "rlnImageSize", "rlnOpticsGroup", "rlnRandomSubset", "rlnBeamTiltX", "rlnBeamTiltY"])


def _numeric_columns(frame, where, path):
    """``frame`` with its NUMERIC_COLUMNS as numbers; refuses a value that is not one, naming its row."""
    for column in NUMERIC_COLUMNS.intersection(frame.columns):
        values = frame[column]
        if values.dtype.kind in "iufb":
            continue
        numbers = pd.to_numeric(values, errors="coerce")
        bad = np.flatnonzero(numbers.isna().to_numpy() & values.notna().to_numpy())
        if bad.size:
            raise PrimeInputError(f"{where} row {bad[0] + 1}: {column} is {str(values.iloc[bad[0]])!r}, "
                                  "not a number", path)
        frame = frame.assign(**{column: numbers})
    return frame


def read_particles(path, pixel_size_A=None):
    """Read a RELION 3.0 or 3.1+ particle STAR file into a :class:`ParticleTable`.

    Parameters
    ----------
    path : str or Path
    pixel_size_A : float, optional
        Pixel size in Angstrom to use when the file carries none (3.0 files
        without rlnMagnification/rlnDetectorPixelSize); where the file gives one,
        it must agree (no rescaling is done).

    Raises PrimeInputError for a file that is not a particle STAR file, a column
    declared twice, a row cut short, text in a numeric column, or a pixel size
    that contradicts ``pixel_size_A``. Values are checked by
    :func:`prime_plugin.core.validation.check_particle_values`.
    """
    path = Path(path)
    if pixel_size_A is not None and not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise PrimeInputError(f"pixel_size_A must be a positive number of Angstrom, got {pixel_size_A:g}",
                              parameter="pixel_size_A")
    blocks = read_star_blocks(path)
    if "particles" in blocks and "optics" in blocks:
        table = _from_31(blocks, path)
    else:
        table = _from_30(blocks, path, pixel_size_A)
    if len(table) == 0:
        raise PrimeInputError("the particle table is empty", path)
    if pixel_size_A is not None:
        _check_requested_pixel_size(table, pixel_size_A, path)
    return table


def _check_requested_pixel_size(table, requested_A, path):
    """Refuse a requested pixel size that differs from the one the file gives."""
    sizes = table.pixel_size_A
    differs = np.abs(sizes - requested_A) > PIXEL_SIZE_TOLERANCE * np.abs(sizes)
    if differs.any():
        source = ("rlnDetectorPixelSize / rlnMagnification" if table.converted_from_30 else "rlnImagePixelSize")
        raise PrimeInputError(f"pixel_size_A {requested_A:g} A differs from the images' pixel size "
                              f"{sizes[differs][0]:g} A ({source}; rescaling is not supported)", path,
                              parameter="pixel_size_A")


def _loop_block(blocks, name, path):
    block = blocks[name]
    if not isinstance(block, pd.DataFrame):
        raise PrimeInputError(f"data_{name} is not a loop_ table", path)
    return block.reset_index(drop=True)


def _from_31(blocks, path):
    optics = _numeric_columns(_loop_block(blocks, "optics", path), "data_optics", path)
    particles = _numeric_columns(_loop_block(blocks, "particles", path), "data_particles", path)
    _require(particles, ["rlnImageName", "rlnOpticsGroup"], "data_particles", path)
    _require(optics, ["rlnOpticsGroup", "rlnImagePixelSize"], "data_optics", path)
    unknown = set(particles["rlnOpticsGroup"]) - set(optics["rlnOpticsGroup"])
    if unknown:
        raise PrimeInputError(f"particles refer to optics groups {sorted(unknown)} missing from data_optics", path)
    others = {k: v for k, v in blocks.items() if k not in ("optics", "particles")}
    return ParticleTable(particles, optics, others, path, converted_from_30=False)


def _require(frame, columns, where, path):
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PrimeInputError(f"{where} lacks required column(s) {', '.join(missing)}", path)


def _particle_block_name_30(blocks, path):
    """The first loop block that names images (RELION 3.0 has no fixed block name)."""
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and "rlnImageName" in block.columns:
            return name
    raise PrimeInputError("no particle table: no loop_ block has an rlnImageName column", path)


def _from_30(blocks, path, pixel_size_A):
    """Convert a RELION 3.0 particle block to the 3.1 layout as relion_convert_star does."""
    name = _particle_block_name_30(blocks, path)
    old = _numeric_columns(_loop_block(blocks, name, path), f"data_{name}", path)
    pixel = _pixel_size_30(old, path, pixel_size_A)
    keys = pd.DataFrame({c: old[c] for c in _OPTICS_COLUMNS_30 if c in old.columns})
    keys["rlnImagePixelSize"] = pixel
    # Optics groups are the distinct optical set-ups, numbered in order of first appearance.
    codes, uniques = pd.MultiIndex.from_frame(keys).factorize()
    group = codes + 1
    optics = pd.DataFrame({"rlnOpticsGroup": np.arange(1, len(uniques) + 1),
                           "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(uniques) + 1)]})
    first_rows = keys.groupby(group, sort=True).head(1).reset_index(drop=True)
    for column in keys.columns:
        optics[column] = first_rows[column].to_numpy()
    image_size = _image_size_of_first_stack(old["rlnImageName"].iloc[0], path)
    if image_size is not None:
        optics["rlnImageSize"] = image_size
        optics["rlnImageDimensionality"] = 2

    particles = old.drop(columns=[c for c in _OPTICS_COLUMNS_30 + _PIXEL_COLUMNS_30 if c in old.columns])
    for axis in "XY":
        if f"rlnOrigin{axis}" in particles.columns:
            particles = particles.drop(columns=[f"rlnOrigin{axis}"])
    particles["rlnOpticsGroup"] = group
    for axis in "XY":
        if f"rlnOrigin{axis}" in old.columns:
            particles[f"rlnOrigin{axis}Angst"] = old[f"rlnOrigin{axis}"].to_numpy(dtype=np.float64) * pixel
    others = {k: v for k, v in blocks.items() if k != name}
    return ParticleTable(particles, optics, others, path, converted_from_30=True)


def _pixel_size_30(old, path, pixel_size_A):
    """Per-particle pixel size (A) of a 3.0 table: from the file when it gives one (a requested
    size must then agree, checked by the caller), else the requested one."""
    if set(_PIXEL_COLUMNS_30) <= set(old.columns):
        magnification = old["rlnMagnification"].to_numpy(dtype=np.float64)
        detector_um = old["rlnDetectorPixelSize"].to_numpy(dtype=np.float64)
        for column, values in (("rlnMagnification", magnification), ("rlnDetectorPixelSize", detector_um)):
            bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
            if bad.size:
                raise PrimeInputError(f"row {bad[0] + 1}: {column} must be a positive number, got "
                                      f"{values[bad[0]]:g}", path)
        return detector_um * 1e4 / magnification
    if "rlnImagePixelSize" in old.columns:
        return old["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    if pixel_size_A is not None:
        return np.full(len(old), float(pixel_size_A))
    raise PrimeInputError(
        "no pixel size: needs data_optics rlnImagePixelSize, or rlnMagnification and "
        "rlnDetectorPixelSize (give --angpix)", path)


def _image_size_of_first_stack(image_name, star_path):
    """Box of the first particle's stack, or None if the stack cannot be found (as RELION)."""
    from prime_plugin.core.images import resolve_image_path, split_image_name, stack_shape

    _, stack = split_image_name(image_name, star_path)
    found = resolve_image_path(stack, star_path)
    return None if found is None else stack_shape(found)[-1]


# ---------------------------------------------------------------- writing

def write_particles(table, path):
    """Write ``table`` as a RELION 3.1 STAR file (optics, particles, then other blocks).

    The file appears atomically: it is written under a temporary name and renamed.
    """
    blocks = {"optics": table.optics, "particles": table.particles}
    for name, block in table.other_blocks.items():
        blocks[name] = block
    write_star_blocks(blocks, path)


def write_star_blocks(blocks, path):
    """Write STAR blocks (name -> DataFrame for loops, dict for key-value pairs) atomically."""
    path = Path(path)
    chunks = []
    for name, block in blocks.items():
        chunks.append(f"\n{STAR_VERSION_LINE}\n\ndata_{name}\n\n")
        chunks.append(_format_loop(block) if isinstance(block, pd.DataFrame) else _format_pairs(block))
    write_text_atomically(path, "".join(chunks))


def _format_loop(frame):
    header = ["loop_"] + [f"_{column} #{i}" for i, column in enumerate(frame.columns, start=1)]
    columns = [_format_column(frame[c]) for c in frame.columns]
    rows = [" ".join(values) for values in zip(*columns)] if columns else []
    return "\n".join(header + rows) + "\n\n"


def _format_pairs(pairs):
    width = max((len(k) for k in pairs), default=0) + 2
    return "".join(f"_{key:<{width}}{_format_value(value)}\n" for key, value in pairs.items()) + "\n"


def _format_column(series):
    """Column values as strings; floats in their shortest exact (repr) form."""
    values = series.to_numpy()
    if values.dtype.kind == "f":
        return [repr(float(v)) for v in values]
    if values.dtype.kind in "iub":
        return [str(int(v)) for v in values]
    return [_format_value(v) for v in values]


def _format_value(value):
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    text = str(value)
    if text == "" or any(ch.isspace() for ch in text):
        return '"' + text.replace('"', "'") + '"'
    return text


def common_pixel_size(table, requested_A=None, path=None):
    """The one pixel size (A) of all particles of ``table``; refuses mixed sizes and a contradicting request.

    requested_A : a pixel size the user gave (``--angpix``), or None. path : the file named in errors.
    """
    sizes = np.unique(table.pixel_size_A)
    if not (np.isfinite(sizes).all() and sizes.min() > 0):
        raise PrimeInputError(f"pixel size must be a positive number of Angstrom, got {sizes.min():g} A", path)
    if np.ptp(sizes) > PIXEL_SIZE_TOLERANCE * sizes.max():
        listed = ", ".join(f"{s:g}" for s in sizes)
        raise PrimeInputError(f"optics groups have different pixel sizes ({listed} A); reconstruct each "
                              "pixel size separately (rescaling is not supported)", path)
    apix = float(sizes[0])
    if not apix > 0:
        raise PrimeInputError(f"pixel size must be positive, got {apix:g} A", path)
    if requested_A is not None and abs(requested_A - apix) > PIXEL_SIZE_TOLERANCE * apix:
        raise PrimeInputError(f"--angpix {requested_A:g} A differs from the images' pixel size {apix:g} A "
                              "(rescaling is not supported)", path)
    return apix
