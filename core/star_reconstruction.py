"""Reconstruct a map from a particle STAR file (angles, origins, CTF), streaming the images.

The driver behind ``prime reconstruct`` (a drop-in for ``relion_reconstruct``):
read the table, check every image stack before anything is computed, then read
the images in chunks and insert each into the Fourier sums of its half-set
(``rlnRandomSubset`` 1 or 2; without that column, even rows go to half 1 and odd
rows to half 2). The halves are inserted one after the other, each into one
padded Fourier grid per thread that are summed once at the end, so memory holds
at most one half's finished sums, the other half's per-thread grids and one
chunk of images, plus a few numbers per particle: it does not grow with the
number of particles.

Regularisation (Wiener term 1/SSNR, see :func:`reconstruct.wiener_regulariser`):

- Both halves (the default): each half is reconstructed with the tiny default
  regulariser only to measure the half-map FSC; the full map is then
  reconstructed from the summed halves with the FSC the full data set is
  expected to reach, ``2 FSC / (1 + FSC)`` (Rosenthal & Henderson 2003): the
  summed data have twice the SSNR of one half, and the term keeps the signal
  power estimated from the halves.
- One half (``subset`` 1 or 2): only that half is read and inserted, as
  ``relion_reconstruct --subset`` does; without the other half there is no FSC,
  so the map gets the tiny default regulariser (1e-3 of each shell's mean
  density weight, like RELION's unregularised reconstruction) and no
  resolution is reported.

Every map is multiplied by a soft spherical mask (radius N / 2, raised-cosine edge
3 px) that zeroes the corners, where gridding leaves aliased noise, as
relion_reconstruct does (RELION fills them with the background mean instead).

All particles must share one pixel size: optics groups with different pixel
sizes are refused (rescaling them to a common grid is not done).
"""

from dataclasses import dataclass, fields

import numpy as np

from prime_plugin.core import memory
from prime_plugin.core.ctf import CtfParams
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import fsc, resolution_at, soft_sphere_mask
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.pipelines import thread_limit
from prime_plugin.core.reconstruct import Backprojector, FourierSums, reconstruct_volume
from prime_plugin.core.symmetry import symmetry_operators
from prime_plugin.core.validation import open_particles, scan_images

GOLD_STANDARD_THRESHOLD = 0.143
CORNER_MASK_EDGE_PX = 3.0


@dataclass
class Reconstruction:
    """A reconstructed map and its half-map statistics.

    Attributes
    ----------
    volume : ndarray, float32 (N, N, N), [z, y, x], centre at N // 2
    pixel_size_A : float
        Voxel size in Angstrom.
    half_map_fsc : ndarray, float64 (N // 2 + 1,) or None
        FSC between the two half maps per Fourier shell (shell k at k / (N apix) 1/A);
        None when only one half was reconstructed.
    resolution_A : float or None
        Where ``half_map_fsc`` drops below 0.143, in Angstrom; None with one half.
    n_particles : int
        Particles inserted (before symmetry expansion).
    """

    volume: np.ndarray
    pixel_size_A: float
    half_map_fsc: np.ndarray = None
    resolution_A: float = None
    n_particles: int = 0


def reconstruct_particles(star_path, *, ctf=False, symmetry="C1", subset=None, max_resolution_A=None,
                          pixel_size_A=None, threads=None, chunk_size=128, progress=None):
    """Reconstruct the map of the particles in a RELION STAR file at their given orientations.

    Parameters
    ----------
    star_path : str or Path
        RELION 3.0 or 3.1+ particle STAR file with rlnAngleRot/Tilt/Psi (degrees)
        and, optionally, origins (rlnOriginXAngst/YAngst, or 3.0 rlnOriginX/Y px).
    ctf : bool
        Correct for the CTF (Wiener filter over particles): images are multiplied
        by their CTF and the density weights are CTF^2.
    symmetry : str
        Point group (``C1``, ``D2``, ``I``...); every symmetry mate is inserted.
    subset : {None, 1, 2}
        Reconstruct both halves (None) or only half-set 1 or 2.
    max_resolution_A : float, optional
        Ignore Fourier components beyond this resolution (Angstrom); default Nyquist.
    pixel_size_A : float, optional
        Pixel size for RELION 3.0 files that carry none; for other files it must
        agree with the images' pixel size (no rescaling is done).
    threads : int, optional
        Threads for the insertion kernels (numba) and the FFTs (scipy); default all.
    chunk_size : int
        Images read and inserted at a time.
    progress : callable, optional
        Called as ``progress(done, total)`` after each chunk (numbers of particles).

    Returns
    -------
    Reconstruction

    Raises
    ------
    PrimeInputError
        For a bad subset, symmetry, STAR file, value (:mod:`~prime_plugin.core.validation`),
        stack, image (NaN or blank), CTF columns, mixed pixel sizes or a map too large for
        this machine's memory, always before any pixel is inserted.
    """
    if subset not in (None, 1, 2):
        raise PrimeInputError(f"--subset must be 1 or 2, got {subset}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if max_resolution_A is not None and not (np.isfinite(max_resolution_A) and max_resolution_A > 0):
        raise PrimeInputError(f"--maxres must be positive, got {max_resolution_A:g} A")
    symmetry_ops = symmetry_operators(symmetry)
    data = open_particles(star_path, pixel_size_A, scan=False)
    table, images, apix = data.table, data.images, data.pixel_size_A
    angles_deg = table.angles_deg
    if angles_deg is None:
        raise PrimeInputError("no orientations: rlnAngleRot, rlnAngleTilt and rlnAnglePsi are needed", star_path)
    ctf_params = CtfParams.from_star(table.particles_with_optics(), star_path) if ctf else None
    half_of = half_sets(table, star_path)
    memory.require(memory.reconstruct_bytes(images.box, len(table), chunk_size), f"reconstructing a map of box "
                   f"{images.box}", "bin the particles to a smaller box, or use a machine with more memory", star_path)
    with images, thread_limit(threads):
        scan_images(images)
        box = images.box
        max_radius_px = None if max_resolution_A is None else _max_radius_px(max_resolution_A, box, apix)
        backprojector = Backprojector(box, max_radius_px=max_radius_px,
                                      symmetry_ops=symmetry_ops if len(symmetry_ops) > 1 else None)
        stream = _ParticleStream(images, backprojector, angles_deg, table.shifts_px, ctf_params, apix,
                                 chunk_size, progress)
        wanted = (1, 2) if subset is None else (subset,)
        for half in wanted:
            if not np.any(half_of == half):
                hint = "" if subset is not None else f" (use --subset {3 - half} for the other half alone)"
                raise PrimeInputError(f"half-set {half} has no particles{hint}", star_path)
        stream.total = int(np.isin(half_of, wanted).sum())
        corners = soft_sphere_mask(box, box / 2.0, CORNER_MASK_EDGE_PX)

        def volume_of(sums, fsc_curve=None, overwrite=False):
            return reconstruct_volume(sums, fsc_curve, max_radius_px=max_radius_px, overwrite=overwrite) * corners

        if subset is not None:
            only = stream.insert_all(np.flatnonzero(half_of == subset))
            return Reconstruction(volume_of(only, overwrite=True), apix, n_particles=stream.total)
        # One half at a time, each half map made as soon as its sums are complete: at most
        # two sets of sums are alive, and the maps are computed in the grids of spent sums.
        half1 = stream.insert_all(np.flatnonzero(half_of == 1))
        map1 = volume_of(half1)
        half2 = stream.insert_all(np.flatnonzero(half_of == 2))
        half1.U += half2.U  # in place: the sums of both halves
        half1.rho += half2.rho
        map2 = volume_of(half2, overwrite=True)
        del half2
        curve = fsc(map1, map2)
        del map1, map2
        volume = volume_of(half1, combined_fsc(curve), overwrite=True)
        return Reconstruction(volume, apix, curve, resolution_at(curve, GOLD_STANDARD_THRESHOLD, box, apix),
                              stream.total)


class _ParticleStream:
    """Reads particles in chunks, transforms them (origin, CTF) and inserts them into Fourier sums."""

    def __init__(self, images, backprojector, angles_deg, shifts_px, ctf_params, pixel_size_A, chunk_size,
                 progress):
        self.images = images
        self.backprojector = backprojector
        self.rotations = euler_to_matrix(angles_deg[:, 0], angles_deg[:, 1], angles_deg[:, 2])
        self.shifts_px = shifts_px
        self.ctf_params = ctf_params
        self.pixel_size_A = pixel_size_A
        self.chunk_size = chunk_size
        self.progress = progress
        self.total = 0
        self.done = 0

    def insert_all(self, rows):
        """FourierSums of the particles ``rows`` (int (k,)), inserted chunk by chunk into one grid."""
        bp = self.backprojector
        sums = FourierSums.zeros(bp.box, bp.padding)
        for chunk_rows, chunk_images in self.images.chunks(self.chunk_size, rows):
            chunk_ctf = None if self.ctf_params is None else _select(self.ctf_params, chunk_rows)
            data, ctf2 = bp.image_transforms(chunk_images, self.shifts_px[chunk_rows], chunk_ctf, self.pixel_size_A)
            bp.insert(sums, data, ctf2, self.rotations[chunk_rows])
            self.done += len(chunk_rows)
            if self.progress is not None:
                self.progress(self.done, self.total)
        return sums


def half_sets(table, path=None):
    """Half-set (1 or 2) of every particle, int64 (n,).

    From rlnRandomSubset when present (every value must be 1 or 2); otherwise
    alternating by row: rows 0, 2, 4... in half 1, rows 1, 3, 5... in half 2.
    """
    if "rlnRandomSubset" not in table.particles.columns:
        return np.arange(len(table), dtype=np.int64) % 2 + 1
    try:
        half = table.particles["rlnRandomSubset"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise PrimeInputError("rlnRandomSubset must hold the numbers 1 or 2", path) from None
    bad = ~np.isin(half, (1.0, 2.0))
    if bad.any():
        raise PrimeInputError(f"rlnRandomSubset must be 1 or 2, found {half[bad][0]:g}", path)
    return half.astype(np.int64)


def combined_fsc(half_map_fsc):
    """FSC expected of the map from both halves, 2 FSC / (1 + FSC), with negative FSC set to 0."""
    f = np.clip(np.asarray(half_map_fsc, np.float64), 0.0, 1.0)
    return 2.0 * f / (1.0 + f)


def _max_radius_px(max_resolution_A, box, apix):
    return min(box * apix / max_resolution_A, box / 2.0)


def _select(params, rows):
    """The CTF parameters of particles ``rows`` (per-particle CtfParams in, per-particle out)."""
    return CtfParams(**{f.name: getattr(params, f.name)[rows] for f in fields(params)})
