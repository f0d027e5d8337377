"""The refinement's unit of work: a chunk of particles -> updated orientations and partial sums (U, rho).

A chunk is particles of one half-set. Its task receives only what it needs, all of it
small or shared: where its images lie (:class:`~prime_plugin.core.images.ImageRows`,
never pixels), its particles' slices of the refinement state (origins, previous
orientations, CTF parameters), and the data every chunk of the pass shares (the polar
references of both half maps and the setup constants), broadcast once per pass. It
reads its images itself (memory-mapped), so it runs the same in this process or on a
Dask worker (:mod:`~prime_plugin.core.execution`).

- :func:`search_chunk` (every iteration): searches the chunk's particles against their
  half's references (exhaustive for particles never searched, stochastic hill climbing
  otherwise; then origins and peak weights) and inserts them at their new orientations.
  Its random numbers come from its own generator, seeded by (seed, iteration, chunk
  index), so a chunk gives the same result wherever and however often it runs.
- :func:`insert_chunk` (the final maps): inserts the chunk's particles at their final
  orientations.

Both return (per-particle output or None, :class:`~prime_plugin.core.reconstruct.FourierSums`
of the chunk alone). Images are normalised on their background first (then soft-masked
for the search), as everywhere in the refinement.
"""

from contextlib import nullcontext
from dataclasses import dataclass, fields

import numpy as np
from prime_plugin.core.ctf import ctf_image
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.noise import fit_to_reference
from prime_plugin.core.pipelines import thread_limit
from prime_plugin.core.polar import apply_shifts, normalise_and_mask, particle_sections, polar_ctf, polar_transforms
from prime_plugin.core.reconstruct import Backprojector, FourierSums
from prime_plugin.core.search import search_particles
from prime_plugin.core.shifts import rotated_half_rings
from prime_plugin.core.working_box import fourier_resize

SEARCH_RANDOM_STREAM = 3  # the chunks' generators: default_rng([seed, 3, iteration, chunk index])
MASK_EDGE_PX = 4.0  # soft edge of the circular mask and margin of the background ring
MIN_PEAK_WEIGHT = 1e-4  # orientations of smaller weight are left out of the reconstruction
RESEARCH_RADIUS = 1.0  # an exhaustive re-search scores origins within this fraction of trs of the previous one


@dataclass
class InsertionSettings:
    """Constants of the reconstruction: box (px) and pixel_size_A (A) of the sums (the working box,
    :mod:`~prime_plugin.core.working_box`), mask_radius_px (px of the stored images: the particle mask;
    the background outside it normalises the images), symmetry_ops float64 (s, 3, 3), threads, the
    threads a task may use (None: the calling process's settings), image_box (px) the stored images'
    box (None: ``box``; larger: the images are Fourier-cropped to ``box`` after normalisation) and
    insertion_radius_px (Fourier px, exclusive; None: Nyquist). Origins and search radii a task
    receives and returns are in stored px."""

    box: int
    pixel_size_A: float
    mask_radius_px: float
    symmetry_ops: np.ndarray
    threads: int = None
    image_box: int = None
    insertion_radius_px: float = None

    @property
    def scale(self):
        """Working px per stored px."""
        return 1.0 if self.image_box is None else self.box / self.image_box

    def working_images(self, images):
        """Stored images float32 (k, n, n), already normalised: at the working box (k, box, box)."""
        return fourier_resize(images, self.box, dims=2)


@dataclass
class SearchSettings:
    """What every chunk of one iteration shares (broadcast once per iteration).

    references : [PolarReferences of half map 1, of half map 2] (D directions each).
    grid : the PolarGrid of this iteration (ring limit). directions_deg : (D, 2) (rot, tilt).
    neighbours : int64 (D, k) direction neighbour table; coarse_directions : int64 indices of
    the coarse subset searched first. trs_px, shift_step_px : origin search radius and grid
    step (px). n_peaks, sigma : orientations kept per particle and their softmax width.
    seed, iteration : with the chunk index, the seed of each chunk's generator.
    insertion : InsertionSettings. subgrid : (symmetry_ops, angular_step_deg) to refine each best
    orientation between the grid points (:mod:`~prime_plugin.core.subgrid`), or None.
    measure_noise : return each particle's residual ring power at its best orientation
    (:func:`~prime_plugin.core.noise.fit_to_reference`) for the noise model.
    scale_weighting : insert each particle with its contrast scale a against its reference (U gets
    a CTF X, rho a^2 CTF^2), so that particles of low contrast (junk among them) weigh little.
    search_mode : "greedy" (every search exhaustive: the coarse directions at every origin offset, then
    a climb over neighbouring directions) or "shc" (stochastic hill climbing from the previous
    orientation, exhaustive only for particles never searched).
    local_window_deg : with it, every particle is searched only within this angle of its chunk's
    centre orientation (SearchChunk.centre_angles_deg) and at origins around the chunk's shifts
    (:mod:`~prime_plugin.core.local_search`); search_mode is then unused.
    research_window_deg : with it (and no local_window_deg), the greedy re-search of a particle searched
    before scores only the orientations within this angle of its current one (SearchChunk.centre_angles_deg)
    instead of the whole coarse grid: at high resolution, where the grid that resolution needs is too fine
    to score everywhere (RELION's local searches of auto-refine's last iterations).
    """

    references: list
    grid: object
    directions_deg: np.ndarray
    neighbours: np.ndarray
    coarse_directions: np.ndarray
    trs_px: float
    shift_step_px: float
    n_peaks: int
    sigma: float
    seed: int
    iteration: int
    insertion: InsertionSettings
    subgrid: tuple = None
    measure_noise: bool = False
    search_mode: str = "greedy"
    scale_weighting: bool = False
    local_window_deg: float = None
    research_window_deg: float = None


@dataclass
class ParticleChunk:
    """The particles of one task, all of half-set ``half``; arrays indexed like ``rows``.

    index : the chunk's place in its pass (seeds its generator). rows : int64 (k,) table
    rows. images : ImageRows. shift_px : float64 (k, 2) RELION origins (x, y) px.
    ctf : CtfParams of the k particles, or None.
    """

    index: int
    half: int
    rows: np.ndarray
    images: object
    shift_px: np.ndarray
    ctf: object


@dataclass
class SearchChunk(ParticleChunk):
    """A search task's particles: direction, psi_index : int64 (k,) the previous orientation
    (direction -1: never searched); ring_weights : float32 (k, K) each particle's weight of the
    iteration's rings (1 / noise power, :mod:`~prime_plugin.core.noise`), or None (unweighted);
    centre_angles_deg : float64 (k, 3) the orientations a local search stays near (SearchSettings.local_window_deg),
    or None."""

    direction: np.ndarray
    psi_index: np.ndarray
    ring_weights: np.ndarray = None
    centre_angles_deg: np.ndarray = None


@dataclass
class InsertChunk(ParticleChunk):
    """An insertion task's particles: peak_angles_deg : float64 (k, p, 3) the n_peaks orientations
    (rot, tilt, psi); peak_weights : float64 (k, p) their weights; scale : float64 (k,) each
    particle's contrast scale (see :func:`insert_particles`), or None."""

    peak_angles_deg: np.ndarray
    peak_weights: np.ndarray
    scale: np.ndarray = None


@dataclass
class ChunkOrientations:
    """A search task's per-particle output, arrays indexed like ``rows`` (k,), p = n_peaks.

    direction, psi_index : int64 (k,) best orientation; shift_px : (k, 2) px; correlation,
    fraction_visited : (k,); peak_directions, peak_psi : int64 (k, p) (direction -1: no peak);
    peak_angles_deg : (k, p, 3) (rot, tilt, psi); peak_weights (0 where no peak),
    peak_correlations : (k, p). scale : (k,) the contrast scale against the reference at the best
    orientation (:func:`~prime_plugin.core.noise.fit_to_reference`, clipped at 0). ring_residual :
    float64 (k, K) the residual ring power there (SearchSettings.measure_noise), else None; not a state field.
    """

    rows: np.ndarray
    direction: np.ndarray
    psi_index: np.ndarray
    shift_px: np.ndarray
    correlation: np.ndarray
    fraction_visited: np.ndarray
    peak_directions: np.ndarray
    peak_psi: np.ndarray
    peak_angles_deg: np.ndarray
    peak_weights: np.ndarray
    peak_correlations: np.ndarray
    scale: np.ndarray
    ring_residual: np.ndarray = None

    # The fields copied one to one from a SearchResult (the others are derived in store()).
    FROM_SEARCH_RESULT = ("direction", "psi_index", "shift_px", "correlation", "fraction_visited", "peak_directions",
                          "peak_psi", "peak_correlations")

    @classmethod
    def per_particle_fields(cls):
        """Every field but ``rows`` and ``ring_residual``: each is a RefineState field of the same name,
        indexed by particle."""
        return tuple(f.name for f in fields(cls) if f.name not in ("rows", "ring_residual"))

    @classmethod
    def empty(cls, rows, n_peaks):
        k = len(rows)
        return cls(rows, np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros((k, 2)), np.zeros(k), np.zeros(k),
                   np.full((k, n_peaks), -1, np.int64), np.zeros((k, n_peaks), np.int64), np.zeros((k, n_peaks, 3)),
                   np.zeros((k, n_peaks)), np.zeros((k, n_peaks)), np.ones(k))

    def store(self, pick, result, directions_deg, psi_step_deg):
        """Fill positions ``pick`` (int array) from a SearchResult of those particles."""
        for name in self.FROM_SEARCH_RESULT:
            getattr(self, name)[pick] = getattr(result, name)
        found = result.peak_directions >= 0
        known = np.maximum(result.peak_directions, 0)
        self.peak_angles_deg[pick] = np.stack([directions_deg[known, 0], directions_deg[known, 1],
                                               result.peak_psi * psi_step_deg], axis=-1)
        self.peak_weights[pick] = np.where(found, result.peak_weights, 0.0)
        if result.best_angles_deg is not None:  # the best orientation refined between the grid points
            self.peak_angles_deg[pick, 0] = result.best_angles_deg


def search_chunk(chunk, settings):
    """Search a :class:`SearchChunk` with :class:`SearchSettings`; returns (ChunkOrientations, FourierSums)."""
    insertion = settings.insertion
    with _task_threads(insertion.threads):
        rng = np.random.default_rng([settings.seed, SEARCH_RANDOM_STREAM, settings.iteration, chunk.index])
        normalised = normalise_and_mask(chunk.images.read(), insertion.mask_radius_px, MASK_EDGE_PX, mask=False)
        masked = insertion.working_images(normalise_and_mask(normalised, insertion.mask_radius_px, MASK_EDGE_PX))
        normalised = insertion.working_images(normalised)
        transforms = polar_transforms(masked, settings.grid)
        del masked
        to_working = insertion.scale  # the search works in px of the working box
        shift_px = chunk.shift_px * to_working
        particles = particle_sections(None, settings.grid, ctf=chunk.ctf, pixel_size_A=insertion.pixel_size_A,
                                      ring_weights=chunk.ring_weights, transforms=transforms)
        references = settings.references[chunk.half - 1]
        found = ChunkOrientations.empty(chunk.rows, settings.n_peaks)
        for pick, previous_known, trs_px, window_deg in _search_groups(chunk, settings):
            pick = np.flatnonzero(pick)
            if pick.size == 0:
                continue
            previous = (chunk.direction[pick], chunk.psi_index[pick]) if previous_known else None
            local = None if window_deg is None else (chunk.centre_angles_deg[pick], insertion.symmetry_ops, window_deg)
            result = search_particles(references, particles.take(pick), settings.grid, shift_px[pick], rng,
                                      previous=previous, n_peaks=settings.n_peaks, sigma=settings.sigma,
                                      trs_px=trs_px * to_working, shift_step_px=settings.shift_step_px * to_working,
                                      neighbours=settings.neighbours, coarse=settings.coarse_directions,
                                      subgrid=settings.subgrid, local=local)
            found.store(pick, result, settings.directions_deg, settings.grid.psi_step_deg)
        del particles
        scale, residual = _fit_at_best(transforms, found, chunk.ctf, references, settings.grid,
                                       insertion.pixel_size_A, chunk.ring_weights)
        found.scale = np.maximum(scale, 0.0)
        if settings.measure_noise:
            found.ring_residual = residual
        del transforms
        sums = insert_particles(normalised, found.shift_px, chunk.ctf, found.peak_angles_deg, found.peak_weights,
                                insertion, found.scale if settings.scale_weighting else None)
        found.shift_px /= to_working
    return found, sums


def _search_groups(chunk, settings):
    """(particles (bool mask), previous orientation known, origin radius px, orientation window deg or None)
    of each kind of search: local searches (all particles, when asked for); else first searches,
    re-searches (origins near the previous ones; exhaustive, or within research_window_deg of the current
    orientation) and stochastic hill climbs."""
    if settings.local_window_deg is not None:
        return [(np.ones(len(chunk.rows), bool), False, settings.trs_px, settings.local_window_deg)]
    searched = chunk.direction >= 0
    climbing = searched & (settings.search_mode == "shc")
    return [(~searched, False, settings.trs_px, None),
            (searched & ~climbing, False, RESEARCH_RADIUS * settings.trs_px, settings.research_window_deg),
            (climbing, True, settings.trs_px, None)]


def _fit_at_best(transforms, found, ctf, references, grid, pixel_size_A, ring_weights):
    """Each particle's contrast scale (k,) and residual ring power (k, K) against its reference at its best
    grid orientation (:func:`~prime_plugin.core.noise.fit_to_reference`)."""
    centred = apply_shifts(transforms, grid, found.shift_px)
    ctf_values = np.ones(centred.shape, np.float32) if ctf is None else polar_ctf(ctf, grid, pixel_size_A)
    best = rotated_half_rings(references.sections[found.direction], found.psi_index)
    return fit_to_reference(centred, ctf_values, best, ring_weights)


def insert_chunk(chunk, insertion):
    """Insert an :class:`InsertChunk` with :class:`InsertionSettings`; returns (None, FourierSums)."""
    with _task_threads(insertion.threads):
        normalised = normalise_and_mask(chunk.images.read(), insertion.mask_radius_px, MASK_EDGE_PX, mask=False)
        sums = insert_particles(insertion.working_images(normalised), chunk.shift_px * insertion.scale, chunk.ctf,
                                chunk.peak_angles_deg, chunk.peak_weights, insertion, chunk.scale)
    return None, sums


def insert_particles(images, shift_px, ctf, peak_angles_deg, peak_weights, insertion, scale=None):
    """Fourier sums of ``images`` float32 (k, N, N) inserted at their weighted orientations.

    shift_px : (k, 2) RELION origins px; ctf : CtfParams of the k images or None;
    peak_angles_deg : (k, p, 3); peak_weights : (k, p) (peaks below MIN_PEAK_WEIGHT are
    left out); scale : (k,) contrast scales a >= 0, or None: image i adds a_i CTF X_i to U and
    a_i^2 CTF^2 to rho (the least-squares map for images X_i = a_i CTF V + noise). Every symmetry
    mate is inserted. Returns new FourierSums of box N.
    """
    ops = insertion.symmetry_ops
    backprojector = Backprojector(insertion.box, max_radius_px=insertion.insertion_radius_px,
                                  symmetry_ops=ops if len(ops) > 1 else None)
    sums = FourierSums.zeros(insertion.box, backprojector.padding)
    ctf_grid = None if ctf is None else ctf_image(ctf, insertion.box, insertion.pixel_size_A, rfft=True)
    data, ctf2 = backprojector.image_transforms(images, shift_px, ctf_grid)
    if scale is not None:
        a = np.asarray(scale, np.float32)[:, None]
        data *= a
        ctf2 *= a * a
    kept = peak_weights > MIN_PEAK_WEIGHT
    image_of = np.nonzero(kept)[0]
    angles = peak_angles_deg[kept]
    backprojector.insert(sums, data, ctf2, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]), image_of,
                         peak_weights[kept])
    return sums


def _task_threads(threads):
    """numba and scipy.fft limited to ``threads`` during a task; None leaves the process's settings."""
    return nullcontext() if threads is None else thread_limit(threads)
