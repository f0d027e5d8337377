"""Write particle data sets: an MRC image stack chunk by chunk, and its STAR file, atomically.

Memory does not grow with the number of images. The stack is laid out by
``mrcfile.new_mmap`` (header for an image stack of n images, as RELION writes
``.mrcs``: mode 2 float32, ispg 0, mz 1), then filled through an ordinary file
handle: pages written that way live in the kernel's page cache, not in the
process (writing through the memory map would keep every written page resident
in the process and make its peak RSS grow with n). The header statistics (min,
max, mean, rms) are accumulated over the chunks and written at the end.

:func:`write_particle_data_set` writes a stack and its STAR file under temporary
names and renames both at the end, so that a failure leaves nothing behind.
"""

import os
from pathlib import Path

import mrcfile
import numpy as np

from prime_plugin.core.atomic_files import temporary_beside

__all__ = ["MrcStackWriter", "write_particle_data_set"]


class MrcStackWriter:
    """Append float32 images to a new MRC stack of a known length.

    Parameters
    ----------
    path : str or Path
        File to create (overwritten if present).
    n_images : int
        Number of images the stack will hold (>= 1).
    box : int
        Image side in pixels.
    pixel_size_A : float
        Pixel size in Angstrom, written to the header.

    Use as a context manager; :meth:`write` appends images, and leaving the
    block without error checks that exactly ``n_images`` were written and
    writes the header statistics.
    """

    def __init__(self, path, n_images, box, pixel_size_A):
        self.path = path
        self.n_images = int(n_images)
        self.box = int(box)
        with mrcfile.new_mmap(path, shape=(self.n_images, self.box, self.box), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A)
            mrc.header.origin = (0.0, 0.0, 0.0)
            self._dtype = mrc.data.dtype  # float32 in the header's byte order
            self._data_offset = int(mrc.header.nbytes + mrc.header.nsymbt)
        self._handle = open(path, "r+b")
        self._handle.seek(self._data_offset)
        self.written = 0
        self._min, self._max = np.inf, -np.inf
        self._sum = self._sum_squares = 0.0

    def write(self, images):
        """Append ``images``, float array (c, box, box) ordered [n, y, x]."""
        images = np.asarray(images, dtype=np.float32).reshape(-1, self.box, self.box)
        if self.written + len(images) > self.n_images:
            raise ValueError(f"stack {self.path} holds {self.n_images} images; cannot write {len(images)} more "
                             f"after {self.written}")
        self._handle.write(images.astype(self._dtype, copy=False).tobytes())
        self.written += len(images)
        if images.size:
            self._min = min(self._min, float(images.min()))
            self._max = max(self._max, float(images.max()))
            self._sum += float(images.sum(dtype=np.float64))
            self._sum_squares += float(np.square(images, dtype=np.float64).sum())

    def close(self):
        """Close the file; the header statistics are written if every image was written."""
        if self._handle.closed:
            return
        self._handle.close()
        if self.written != self.n_images:
            return
        count = float(self.n_images) * self.box * self.box
        mean = self._sum / count
        with mrcfile.mmap(self.path, mode="r+") as mrc:  # maps the data without touching its pages
            mrc.header.dmin = self._min
            mrc.header.dmax = self._max
            mrc.header.dmean = mean
            mrc.header.rms = np.sqrt(max(self._sum_squares / count - mean * mean, 0.0))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close()
        if kind is None and self.written != self.n_images:
            raise ValueError(f"stack {self.path}: {self.written} of {self.n_images} images written")
        return False


def write_particle_data_set(out_dir, stack_name, star_name, image_chunks, optics, particles, progress=None):
    """Write ``out_dir/stack_name`` and ``out_dir/star_name`` (RELION 3.1 layout), or nothing.

    Parameters
    ----------
    out_dir : Path
        Folder, created if needed (and removed again if the writing fails and it is empty).
    stack_name, star_name : str
        File names in ``out_dir``; existing files are replaced.
    image_chunks : iterable of float arrays (c, box, box), [n, y, x]
        The images in order, ``len(particles)`` in all; the box and pixel size come
        from the optics table's ``rlnImageSize`` and ``rlnImagePixelSize``.
    optics, particles : pandas.DataFrame
        The STAR file's ``data_optics`` and ``data_particles`` tables.
    progress : callable, optional
        Called with the number of images of each chunk once it is written.
    """
    from prime_plugin.core.star import write_star_blocks

    out_dir = Path(out_dir)
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = [temporary_beside(out_dir / name) for name in (stack_name, star_name)]
    box, pixel_size_A = int(optics["rlnImageSize"].iloc[0]), float(optics["rlnImagePixelSize"].iloc[0])
    done = False
    try:
        with MrcStackWriter(temporary[0], len(particles), box, pixel_size_A) as stack:
            for chunk in image_chunks:
                stack.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        write_star_blocks({"optics": optics, "particles": particles}, temporary[1])
        os.replace(temporary[0], out_dir / stack_name)
        os.replace(temporary[1], out_dir / star_name)
        done = True
    finally:
        for path in temporary:
            if path.exists():
                path.unlink()
        if created_dir and not done and not any(out_dir.iterdir()):
            out_dir.rmdir()
