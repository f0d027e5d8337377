"""Particle images named in a STAR file, read lazily from memory-mapped MRC stacks.

RELION names an image ``000123@path/stack.mrcs`` (1-based index into a stack) or
``path/image.mrc`` (a single image). A relative path is resolved as RELION does:
first against the working directory (RELION's project directory), then against
the STAR file's folder. ``.mrcs`` and ``.mrc`` stacks are accepted, in float32,
float16 (mode 12, written by RELION 4+) or any other MRC mode (returned as float32).
Images are only ever read in chunks, so memory does not grow with the number of
particles beyond the index arrays: after each chunk is copied out, the mapped
pages are handed back to the kernel (``madvise(MADV_DONTNEED)``), so that the
process's resident set does not grow with the file pages it has read.
"""

import mmap
from collections import OrderedDict
from pathlib import Path

import mrcfile
import numpy as np

from prime_plugin.core.errors import PrimeInputError


def split_image_name(name, star_path=None):
    """Split a RELION image name into (0-based index, path string).

    ``'000123@stacks/a.mrcs'`` -> ``(122, 'stacks/a.mrcs')``; ``'img.mrc'`` -> ``(0, 'img.mrc')``.
    """
    text = str(name).strip()
    if "@" not in text:
        return 0, text
    number, stack = text.split("@", 1)
    try:
        index = int(number)
    except ValueError:
        raise PrimeInputError(f"bad image name {text!r}: expected N@stack", star_path) from None
    if index < 1:
        raise PrimeInputError(f"bad image name {text!r}: image numbers start at 1", star_path)
    return index - 1, stack


def resolve_image_path(stack, star_path=None):
    """The existing file a RELION image path refers to, or None.

    Absolute paths are used as they are; relative ones are tried against the
    working directory, then against the folder of ``star_path``.
    """
    candidate = Path(stack)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    if candidate.is_file():
        return candidate
    if star_path is not None:
        beside = Path(star_path).parent / candidate
        if beside.is_file():
            return beside
    return None


def stack_shape(path):
    """(n_images, ny, nx) of an MRC image or stack, from its header only."""
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
            header = mrc.header
            nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
            if header.map is None or header.map.tobytes()[:3] != b"MAP":
                raise ValueError("no MAP signature")
    except (ValueError, OSError) as exc:
        raise PrimeInputError(f"not an MRC image stack ({exc})", path) from None
    return max(nz, 1), ny, nx


def _release_pages(data):
    """Drop the mapped file pages of memory-mapped ``data`` from the resident set (page cache kept)."""
    mapping = getattr(data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class ParticleImages:
    """Lazy, validated access to the images of a :class:`~prime_plugin.core.star.ParticleTable`.

    Construction checks, without reading pixels, that every stack exists, is an
    MRC file, holds every index asked of it, and that all images share one square
    box equal to the optics table's ``rlnImageSize`` when present.

    Attributes
    ----------
    box : int
        Image side in pixels.
    stack_paths : list of Path
        The distinct stack files; ``stack_id[i]`` and ``index_in_stack[i]`` locate particle i.
    """

    def __init__(self, table, max_open_stacks=32):
        names = table.particles["rlnImageName"].to_numpy()
        self._source = table.source
        split = [split_image_name(n, table.source) for n in names]
        stacks = {}
        self.stack_id = np.empty(len(names), dtype=np.int64)
        self.index_in_stack = np.empty(len(names), dtype=np.int64)
        for i, (index, stack) in enumerate(split):
            self.stack_id[i] = stacks.setdefault(stack, len(stacks))
            self.index_in_stack[i] = index
        self.stack_paths = []
        shapes = []
        for stack in stacks:
            found = resolve_image_path(stack, table.source)
            if found is None:
                raise PrimeInputError(
                    f"image stack {stack} not found (looked in {Path.cwd()} and beside the STAR file)",
                    table.source)
            self.stack_paths.append(found)
            shapes.append(stack_shape(found))
        self._stack_names = list(stacks)
        self._check_indices(shapes, names)
        self.box = self._common_box(shapes, table)
        self._open = OrderedDict()
        self._max_open = max_open_stacks

    def _check_indices(self, shapes, names):
        lengths = np.array([s[0] for s in shapes])
        past = np.nonzero(self.index_in_stack >= lengths[self.stack_id])[0]
        if past.size:
            i = past[0]
            stack = self.stack_paths[self.stack_id[i]]
            raise PrimeInputError(
                f"image {names[i]} is past the end of {stack} ({lengths[self.stack_id[i]]} images)", self._source)

    def _common_box(self, shapes, table):
        sides = {(ny, nx) for _, ny, nx in shapes}
        if len(sides) != 1:
            raise PrimeInputError(f"image stacks have different sizes {sorted(sides)}", self._source)
        ny, nx = sides.pop()
        if ny != nx:
            raise PrimeInputError(f"images are {nx} x {ny} pixels; square images are required", self._source)
        if "rlnImageSize" in table.optics.columns:
            declared = set(int(v) for v in table.optics["rlnImageSize"])
            if declared != {nx}:
                raise PrimeInputError(
                    f"optics table says rlnImageSize {sorted(declared)} but the stacks hold {nx} x {nx} images",
                    self._source)
        return nx

    def __len__(self):
        return len(self.stack_id)

    def names_from_working_directory(self):
        """RELION image names (n,) that resolve from the working directory, as RELION resolves them.

        Names whose stack was found beside the STAR file (not from the working directory)
        get that stack's path relative to the working directory; the others are unchanged.
        For STAR files written elsewhere (e.g. a refinement's run_data.star).
        """
        import os

        fixed = []
        for name, found in zip(self._stack_names, self.stack_paths):
            fixed.append(name if Path(name).is_absolute() or Path(name).resolve() == found.resolve()
                         else os.path.relpath(found))
        stacks = np.array(fixed, dtype=object)[self.stack_id]
        return [f"{i + 1:06d}@{stack}" for i, stack in zip(self.index_in_stack, stacks)]

    def _stack_data(self, sid):
        """Memory-mapped data of stack ``sid`` as (n, ny, nx); a few stacks stay open."""
        if sid in self._open:
            self._open.move_to_end(sid)
            return self._open[sid].data
        if len(self._open) >= self._max_open:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        mrc = mrcfile.mmap(self.stack_paths[sid], mode="r", permissive=True)
        self._open[sid] = mrc
        return mrc.data

    def read(self, indices):
        """Images of particles ``indices`` (int array, table rows) as float32 (k, box, box).

        Raises PrimeInputError if any pixel is NaN or infinite.
        """
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        sids = self.stack_id[indices]
        for sid in np.unique(sids):
            rows = np.nonzero(sids == sid)[0]
            data = self._stack_data(int(sid))
            if data.ndim == 2:
                data = data[None]
            out[rows] = data[self.index_in_stack[indices[rows]]]
            bad = ~np.isfinite(out[rows]).all(axis=(1, 2))
            if bad.any():
                k = rows[np.argmax(bad)]
                raise PrimeInputError(
                    f"image {self.index_in_stack[indices[k]] + 1} holds NaN or infinite pixels",
                    self.stack_paths[sid])
            _release_pages(data)
        return out

    def chunks(self, chunk_size=512, indices=None):
        """Yield (row_indices, images) over the particles (all, or ``indices``) in order."""
        rows = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, len(rows), chunk_size):
            part = rows[start:start + chunk_size]
            yield part, self.read(part)

    def close(self):
        """Close every open stack."""
        while self._open:
            _, mrc = self._open.popitem()
            mrc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
