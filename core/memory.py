"""How much memory a run will need, against what this machine has: refuse before allocating.

The estimates are models of the engine's largest arrays, calibrated on measured peaks
(resident set of ``prime refine`` and ``prime reconstruct`` at boxes 64 and 128 on the
2-core development machine; within about 10% there):

- Fourier sums of one half-set: U complex64 + rho float32 on the padded half grid,
  (M, M, M // 2 + 1) with M = 2 N, 12 bytes a voxel.
- ``prime reconstruct``: three sets of sums (both halves, then the maps made in their
  grids) and a chunk of images.
- ``prime refine``: the largest of three phases: the projection directions (two
  temporaries of the direction search, quadratic in the number of directions:
  :func:`~prime_plugin.core.directions.coarse_subset`), the search (polar references of
  both half maps at the highest ring limit, box // 2 - 2, built while the last ones are
  alive: 4 x K x (n_rot + 1) complex64 per direction, plus seven sets of sums: a pass is
  searched against the sums without its own previous insertions) and the
  map updates (7.5 sets of sums: the state's two, the new totals, a chunk's partial sums
  and the reconstructions' grids); plus about 2 KB a particle.
- Resampling a reference by Fourier cropping or padding: 32 bytes a voxel of the grid at
  the new pixel size (complex64 spectra and their transforms, one axis at a time).
- Simulating images: the projector's grid, 64 bytes per voxel of the box, and a chunk of images.

Available memory: ``MemAvailable`` of /proc/meminfo (what can be had without swapping),
lowered to what a cgroup limit (containers, batch schedulers) leaves, else the free pages
that ``os.sysconf`` reports.
"""

import os
from pathlib import Path

from prime_plugin.core.errors import PrimeInputError

__all__ = ["available_bytes", "sums_bytes", "refine_bytes", "reconstruct_bytes", "simulate_bytes", "resample_bytes",
           "require"]

BASELINE_BYTES = 250 * 2**20  # Python, numpy, scipy, numba and their caches, measured at start
PER_PARTICLE_BYTES = 2048  # the STAR table, the refinement state and the output tables
SUMS_SETS_UPDATING = 7.5  # sets of sums alive while a refinement iteration updates its maps
SUMS_SETS_SEARCHING = 7.0  # ... while it searches (the state's two, the pass's previous insertions and the sums
# without them, two each, the chunks' partial sums and one new total)
SUMS_SETS_RECONSTRUCTING = 3.0
IMAGE_COPIES = 8  # float32 copies of a chunk of images in a task (read, normalised, masked, transforms)


def sums_bytes(box, padding=2.0):
    """Bytes of one half-set's Fourier sums (U complex64, rho float32) for images of ``box`` px."""
    padded = int(round(padding * box))
    return padded * padded * (padded // 2 + 1) * 12


def refine_bytes(box, n_particles, n_space, n_rot, symmetry_order=1, chunk_size=256, local_workers=0):
    """Estimated peak bytes of a refinement, as {what: bytes} (the parts add up to the peak).

    box : image side (px); n_space : projection directions; n_rot : in-plane angles of the
    polar grid; symmetry_order : operators of the point group; local_workers : Dask worker
    processes started on this machine (each holds references and partial sums of its own).
    """
    rings = max(1, box // 2 - 3)  # rings 2 .. box // 2 - 2, the highest ring limit
    references = 4 * rings * (n_rot + 1) * 8 * n_space
    directions = 8 * n_space * symmetry_order * max(min(n_space, 1024), n_space // 4) * 1.1
    grids = sums_bytes(box)
    chunk = min(chunk_size, n_particles) * box * box * 4 * IMAGE_COPIES
    phases = {"polar references": references + SUMS_SETS_SEARCHING * grids,
              "Fourier grids": SUMS_SETS_UPDATING * grids,
              "direction search": directions}
    largest = max(phases, key=phases.get)
    parts = {largest: phases[largest], "particles": n_particles * PER_PARTICLE_BYTES + chunk,
             "program": BASELINE_BYTES}
    if local_workers:
        worker = BASELINE_BYTES + references / 2 + 2 * grids + chunk
        parts["local workers"] = local_workers * worker
    return parts


def reconstruct_bytes(box, n_particles, chunk_size=128):
    """Estimated peak bytes of ``prime reconstruct``, as {what: bytes}."""
    return {"Fourier grids": SUMS_SETS_RECONSTRUCTING * sums_bytes(box),
            "particles": (n_particles * PER_PARTICLE_BYTES // 2
                          + min(chunk_size, n_particles) * box * box * 4 * IMAGE_COPIES),
            "program": BASELINE_BYTES}


def simulate_bytes(box, chunk_images):
    """Estimated peak bytes of simulating images of ``box`` px, ``chunk_images`` at a time, as {what: bytes}:
    the projector's padded Fourier grid (a float32 volume and its transform at twice the box) and the chunk."""
    return {"projector": 64 * float(box) ** 3, "images": chunk_images * box * box * 4 * IMAGE_COPIES,
            "program": BASELINE_BYTES}


def resample_bytes(box, pixel_size_A, new_pixel_size_A):
    """Peak bytes of resampling a ``box``^3 map from ``pixel_size_A`` to ``new_pixel_size_A`` (Fourier)."""
    from prime_plugin.core.resample import fourier_resampled_box

    new_box = fourier_resampled_box(box, pixel_size_A, new_pixel_size_A)
    return 32 * float(max(new_box, box)) ** 3


def available_bytes():
    """Memory this process can still use without swapping (bytes), see the module docstring."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_room()
    if limit is not None:
        found.append(limit)
    return min(found)


def _cgroup_room():
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = Path("/sys/fs/cgroup", usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - int(usage))
    return None


def gigabytes(n_bytes):
    """``n_bytes`` for a reader: '1.5 GB', '0.3 GB', '12 TB'."""
    for unit, size in (("PB", 2**50), ("TB", 2**40)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{n_bytes / 2**30:.1f} GB"


def require(parts, what, advice, path=None, parameter=None, available=None):
    """Refuse (PrimeInputError, one line) when ``parts`` ({what: bytes}) add up to more than is available.

    what : the work, e.g. "the refinement"; advice : how to run it anyway, e.g. "lower n_space";
    available : bytes (default :func:`available_bytes`; nothing is refused when unknown).
    """
    available = available_bytes() if available is None else available
    needed = sum(parts.values())
    if available is None or needed <= available:
        return
    detail = ", ".join(f"{name} {gigabytes(size)}" for name, size in sorted(parts.items(), key=lambda p: -p[1]))
    detail = f" ({detail})" if len(parts) > 1 else ""
    raise PrimeInputError(f"{what} needs about {gigabytes(needed)} of memory{detail}, more than the "
                          f"{gigabytes(available)} available here: {advice}", path, parameter=parameter)
