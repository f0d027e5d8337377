"""Everything a refinement derives once from its inputs, checked before anything is written.

The particles (STAR, images, CTF, half-sets), the starting reference (resampled to the
particles' pixel size and box when needed, low-passed to the initial resolution), the
masks, the projection directions of the asymmetric unit and the polar sampling.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prime_plugin.core import memory
from prime_plugin.core.ctf import CtfParams
from prime_plugin.core.directions import coarse_subset, direction_neighbours, directions_for_count
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.execution import check_backend_choice, local_worker_count
from prime_plugin.core.fourier import low_pass, soft_sphere_mask
from prime_plugin.core.images import ParticleImages
from prime_plugin.core.mrc import read_volume
from prime_plugin.core.noise import noise_groups
from prime_plugin.core.polar import default_n_rot
from prime_plugin.core.resample import resample_volume
from prime_plugin.core.symmetry import symmetry_operators
from prime_plugin.core.validation import (check_finite_parameters, check_output_folder, open_particles, reference_for,
                                          scan_images)

MIN_PARTICLES_PER_HALF = 10
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")


@dataclass
class RefineSetup:
    """Derived inputs of a refinement (see module docstring). Volumes are float32 (N, N, N)."""

    table: object
    images: ParticleImages
    pixel_size_A: float
    box: int
    ctf: object
    half: np.ndarray
    start_shifts_px: np.ndarray
    reference: np.ndarray
    mask: np.ndarray
    mask_radius_px: float
    symmetry_ops: np.ndarray
    directions_deg: np.ndarray
    angular_step_deg: float
    neighbours: np.ndarray
    coarse_directions: np.ndarray
    n_rot: int
    initial_ring_limit: int
    trs_px: float
    shift_step_px: float
    image_names: list
    notes: list
    noise_groups: tuple
    noise_by_micrograph: bool
    input_angles_deg: np.ndarray = None


def prepare(params):
    """Read and check every input of ``params`` (a RefineParameters); raise PrimeInputError on the first problem.

    The cheap checks come first (numbers, files, headers, memory), then every image is read once
    (:func:`~prime_plugin.core.validation.scan_images`), then the reference is resampled if needed.
    """
    _check_numbers(params)
    check_output_folder(params.output_dir)
    symmetry_ops = symmetry_operators(params.symmetry)
    data = open_particles(params.particles, params.pixel_size_A, scan=False)
    table, images, apix = data.table, data.images, data.pixel_size_A
    box = images.box
    input_angles = table.angles_deg
    if params.local_sigma_deg is not None and input_angles is None:
        raise PrimeInputError("has no rlnAngleRot, rlnAngleTilt and rlnAnglePsi: a local refinement (--local) "
                              "starts from the particles' orientations", params.particles)
    half = _half_sets(table, params)
    notes = [f"{len(table)} particles of {box} px at {apix:g} A/px; half-sets of {(half == 1).sum()} and "
             f"{(half == 2).sum()} ({'rlnRandomSubset' if 'rlnRandomSubset' in table.particles else 'random split'})."]
    ctf = _ctf_parameters(params, table, notes)
    mask_radius_px = _mask_radius_px(params, box, apix)
    trs = params.trs_px if params.trs_px is not None else float(np.clip(0.08 * box, 2.0, 8.0))
    if trs > box / 2:
        raise PrimeInputError(f"trs_px {trs:g} px reaches beyond half the {box} px box", parameter="trs_px")
    try:
        plan = reference_for(params.reference, box, apix)
        check_refine_memory(params, box, len(table), mask_radius_px, len(symmetry_ops))
        scan_images(images)
        reference = _starting_reference(params, plan, box, apix, notes)
        mask = _solvent_mask(params, box) if params.solvent_mask else soft_sphere_mask(box, mask_radius_px, 4.0)
        if params.solvent_mask:
            notes.append("Resolutions: the FSC under the solvent mask, corrected for the mask by phase "
                         "randomisation (as relion_postprocess).")
    except BaseException:
        images.close()
        raise
    directions, step = directions_for_count(params.symmetry, params.n_space)
    neighbours = direction_neighbours(directions, symmetry_ops)
    ring_limit = int(np.clip(np.floor(box * apix / params.ini_high_A), 3, box // 2 - 2))
    shift_step = params.shift_step_px if params.shift_step_px is not None else max(1.0, trs / 2.0)
    return RefineSetup(table, images, apix, box, ctf, half, table.shifts_px, reference, mask, mask_radius_px,
                       symmetry_ops, directions, step, neighbours, coarse_subset(directions, symmetry_ops),
                       default_n_rot(mask_radius_px), ring_limit, trs, shift_step, _image_names(table, images, notes),
                       notes, noise_groups(table), "rlnMicrographName" in table.particles.columns,
                       input_angles)


def _image_names(table, images, notes):
    """Image names for the output STAR files: unchanged when they resolve from the working
    directory (RELION's rule), else rewritten so that they do."""
    names = images.names_from_working_directory()
    original = table.particles["rlnImageName"].astype(str).tolist()
    if all(_same_image(a, b) for a, b in zip(names, original)):
        return original
    notes.append("Image paths rewritten relative to the working directory in the output STAR files.")
    return names


def _same_image(a, b):
    index_a, stack_a = a.split("@", 1) if "@" in a else ("1", a)
    index_b, stack_b = b.split("@", 1) if "@" in b else ("1", b)
    return int(index_a) == int(index_b) and stack_a == stack_b


def _ctf_parameters(params, table, notes):
    """Per-particle CtfParams, or None when CTF correction is off (asked for: params.ctf False)."""
    if not params.ctf:
        notes.append("CTF correction off (asked for): refining without it.")
        return None
    missing = [c for c in CTF_COLUMNS if c not in table.particles.columns]
    if missing:
        raise PrimeInputError(f"the particles carry no CTF parameters ({', '.join(missing)} missing): add them, or "
                              "refine without CTF correction (ctf=False)", params.particles, parameter="ctf=False")
    return CtfParams.from_star(table.particles_with_optics(), params.particles)


def check_refine_memory(params, box, n_particles, mask_radius_px, symmetry_order, available=None):
    """Refuse a refinement that needs more memory than this machine has (:mod:`~prime_plugin.core.memory`),
    saying how many directions would fit."""
    available = memory.available_bytes() if available is None else available
    workers = local_worker_count(params.cluster) if params.cluster else 0
    n_rot = default_n_rot(mask_radius_px)

    def needed(n_space):
        return memory.refine_bytes(box, n_particles, n_space, n_rot, symmetry_order, params.chunk_size, workers)

    if available is None or sum(needed(params.n_space).values()) <= available:
        return
    low, high = 0, params.n_space  # the most directions that fit: needed() grows with n_space
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if sum(needed(middle).values()) <= available else (low, middle)
    advice = (f"lower n_space (about {low} fits)" if low >= 100 else
              "bin the particles to a smaller box, or use a machine with more memory")
    memory.require(needed(params.n_space), f"the refinement (box {box}, n_space {params.n_space})", advice,
                   parameter="n_space", available=available)


def _check_numbers(params):
    """Refuse parameters out of range, in the command line's words."""
    check_finite_parameters(params)
    if not 0 < params.update_fraction <= 1:
        raise PrimeInputError(f"--update_frac must be in (0, 1], got {params.update_fraction:g}")
    if params.max_iter < 1:
        raise PrimeInputError(f"--max_iter must be at least 1, got {params.max_iter}")
    if params.search_mode not in ("greedy", "shc"):
        raise PrimeInputError(f"the search is greedy or shc, got {params.search_mode!r}")
    for name, value in (("--npeaks", params.n_peaks), ("--nspace", params.n_space)):
        if value < 1:
            raise PrimeInputError(f"{name} must be at least 1, got {value}")
    if params.ini_high_A <= 0:
        raise PrimeInputError(f"--ini_high must be positive, got {params.ini_high_A:g} A")
    if not params.sigma > 0:  # it divides (1 - corr) in the weights' exponent
        raise PrimeInputError(f"--sigma must be positive, got {params.sigma:g}")
    if params.trs_px is not None and params.trs_px < 0:
        raise PrimeInputError(f"--trs must not be negative, got {params.trs_px:g} px")
    if params.shift_step_px is not None and not params.shift_step_px > 0:
        raise PrimeInputError(f"shift_step_px must be positive, got {params.shift_step_px:g} px",
                              parameter="shift_step_px")
    if int(params.seed) != params.seed or params.seed < 0:
        raise PrimeInputError(f"seed must be a whole number >= 0, got {params.seed!r}", parameter="seed")
    if params.local_sigma_deg is not None and not params.local_sigma_deg > 0:
        raise PrimeInputError(f"--sigma_ang must be positive, got {params.local_sigma_deg:g} deg")
    if int(params.chunk_size) != params.chunk_size or params.chunk_size < 1:
        raise PrimeInputError(f"chunk_size must be a whole number of particles >= 1, got {params.chunk_size!r}")
    check_backend_choice(params.scheduler, params.cluster)


def _half_sets(table, params):
    """rlnRandomSubset when present (1/2), else a random split seeded by ``params.seed``."""
    from prime_plugin.core.star_reconstruction import half_sets

    if "rlnRandomSubset" in table.particles.columns:
        half = half_sets(table, params.particles)
    else:
        rng = np.random.default_rng([params.seed, 1])
        half = (rng.permutation(len(table)) % 2 + 1).astype(np.int64)
    for h in (1, 2):
        if (half == h).sum() < MIN_PARTICLES_PER_HALF:
            raise PrimeInputError(f"half-set {h} has {(half == h).sum()} particles; a gold-standard refinement "
                                  f"needs at least {MIN_PARTICLES_PER_HALF} in each", params.particles)
    return half


def _mask_radius_px(params, box, apix):
    diameter = params.particle_diameter_A if params.particle_diameter_A is not None else 0.9 * box * apix
    if diameter <= 0:
        raise PrimeInputError(f"--particle_diameter must be positive, got {diameter:g} A")
    if diameter > box * apix:
        raise PrimeInputError(f"--particle_diameter {diameter:g} A is larger than the box ({box} px x {apix:g} A "
                              f"= {box * apix:g} A)")
    return diameter / 2.0 / apix


def _starting_reference(params, plan, box, apix, notes):
    """The reference (a checked :class:`~prime_plugin.core.validation.ReferencePlan`) at the particles'
    pixel size and box, low-passed to ini_high."""
    volume, ref_apix, ref_box = plan.volume, plan.pixel_size_A, plan.volume.shape[0]
    if plan.note:
        notes.append(plan.note)
    if plan.resample:
        try:
            volume, achieved = resample_volume(volume, ref_apix, apix, box)
        except (ValueError, PrimeInputError) as exc:
            raise PrimeInputError(f"cannot resample the reference to {box} px of {apix:g} A ({exc})",
                                  params.reference) from None
        if abs(achieved - apix) > 1e-2 * apix:
            raise PrimeInputError(f"cannot resample the reference ({ref_apix:g} A) to {apix:g} A: "
                                  f"the nearest is {achieved:g} A", params.reference)
        notes.append(f"Reference resampled from {ref_apix:g} A/px and box {ref_box} to {apix:g} A/px and box {box}.")
    return low_pass(volume, params.ini_high_A, apix)


def _solvent_mask(params, box):
    mask, _ = read_volume(params.solvent_mask, expected_box=box)
    if mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
        raise PrimeInputError(f"a solvent mask holds values in [0, 1], found {mask.min():g}..{mask.max():g}",
                              Path(params.solvent_mask))
    if not mask.max() > 0:
        raise PrimeInputError("the solvent mask is all zeros: it would mask out the whole map",
                              Path(params.solvent_mask))
    return np.clip(mask, 0.0, 1.0).astype(np.float32)
