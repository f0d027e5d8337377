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

:meth:`ParticleImages.locate` describes where some particles' images lie
(:class:`ImageRows`: absolute stack paths and indices, no pixels), so that another
process, or a Dask worker on another machine that mounts the same files, reads them
itself.
"""

import mmap
import os
import warnings
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.mrc import BYTES_PER_VOXEL, check_real_mode, mrc_header


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
    header = mrc_header(path, "image stack")
    check_real_mode(header, path, "image")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if nx < 1 or ny < 1:
        raise PrimeInputError(f"not an MRC image stack (images of {nx} x {ny} pixels)", path)
    try:
        size = Path(path).stat().st_size
    except OSError as exc:
        raise PrimeInputError(f"not an MRC image stack ({exc})", path) from None
    expected = 1024 + int(header.nsymbt) + nx * ny * max(nz, 1) * BYTES_PER_VOXEL[int(header.mode)]
    if size < expected:
        raise PrimeInputError(f"truncated: {size} bytes where the header announces {max(nz, 1)} images of "
                              f"{nx} x {ny} ({expected} bytes)", path)
    return max(nz, 1), ny, nx


def _open_stack(path):
    """mrcfile's memory map of a stack whose header was checked (:func:`stack_shape`); its remarks on
    unusual but readable headers (machine stamp...) are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mrcfile.mmap(path, mode="r", permissive=True)


def _release_pages(data):
    """Drop the mapped file pages of memory-mapped ``data`` from the resident set (page cache kept)."""
    mapping = getattr(data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _gather_images(stack_data, stack_paths, stack_id, index_in_stack, box):
    """Copy images out of their stacks into float32 (k, box, box).

    stack_data(s) gives the memory-mapped data of stack s, (n, box, box) or (box, box);
    stack_id (k,) and index_in_stack (k,) (0-based) locate each image. Raises
    PrimeInputError naming the stack if any pixel is NaN or infinite.
    """
    out = np.empty((len(stack_id), box, box), dtype=np.float32)
    for sid in np.unique(stack_id):
        rows = np.nonzero(stack_id == sid)[0]
        data = stack_data(int(sid))
        if data.ndim == 2:
            data = data[None]
        out[rows] = data[index_in_stack[rows]]
        bad = ~np.isfinite(out[rows]).all(axis=(1, 2))
        if bad.any():
            k = rows[np.argmax(bad)]
            raise PrimeInputError(f"image {index_in_stack[k] + 1} holds NaN or infinite pixels", stack_paths[sid])
        _release_pages(data)
    return out


@dataclass(frozen=True, eq=False)
class ImageRows:
    """Where the images of some particles lie, without their pixels (small; sent to other processes).

    stack_paths : tuple of str, the absolute paths of the stacks these particles use.
    stack_id : int64 (k,), the stack of each particle (index into stack_paths).
    index_in_stack : int64 (k,), its 0-based image index in that stack.
    box : int, the image side in pixels.
    """

    stack_paths: tuple
    stack_id: np.ndarray
    index_in_stack: np.ndarray
    box: int

    def __len__(self):
        return len(self.stack_id)

    def read(self):
        """The images, float32 (k, box, box), in row order; each stack memory-mapped while it is read."""
        with ExitStack() as opened:
            def stack_data(sid):
                path = self.stack_paths[sid]
                try:
                    mrc = opened.enter_context(_open_stack(path))
                except (OSError, ValueError) as exc:
                    raise PrimeInputError(f"cannot read this image stack here ({exc}); every process of the run "
                                          f"must see the images under the same path", path) from None
                return mrc.data

            return _gather_images(stack_data, self.stack_paths, self.stack_id, self.index_in_stack, self.box)


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
        self._absolute_paths = [os.path.abspath(path) for path in self.stack_paths]
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
        mrc = _open_stack(self.stack_paths[sid])
        self._open[sid] = mrc
        return mrc.data

    def read(self, indices):
        """Images of particles ``indices`` (int array, table rows) as float32 (k, box, box).

        Raises PrimeInputError if any pixel is NaN or infinite.
        """
        indices = np.asarray(indices, dtype=np.int64)
        return _gather_images(self._stack_data, self.stack_paths, self.stack_id[indices],
                              self.index_in_stack[indices], self.box)

    def locate(self, indices):
        """Where the images of particles ``indices`` (int array, table rows) lie, as :class:`ImageRows`.

        Only the stacks these particles use are named, by absolute path.
        """
        indices = np.asarray(indices, dtype=np.int64)
        used, stack_id = np.unique(self.stack_id[indices], return_inverse=True)
        return ImageRows(tuple(self._absolute_paths[s] for s in used), stack_id.astype(np.int64).ravel(),
                         self.index_in_stack[indices], self.box)

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
