"""PRIME engine: framework-agnostic (never imports Scipion).

The public API, used by the command line, the Scipion plugin and outside checks,
is re-exported here; each concept lives in its own module (``star``, ``images``,
``mrc``, ``geometry``, ``symmetry``, ``directions``, ``ctf``, ``projector``,
``reconstruct``, ``polar``, ``correlate``, ``shifts``, ``search``...).
"""

from prime_plugin.core.ctf import CtfParams, ctf_at, ctf_image, electron_wavelength_A
from prime_plugin.core.directions import asymmetric_unit_directions, directions_for_count
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.geometry import euler_to_matrix, matrix_to_euler, projection_direction
from prime_plugin.core.images import ParticleImages
from prime_plugin.core.mrc import read_volume, write_volume
from prime_plugin.core.fourier import fsc, low_pass, resolution_at, soft_sphere_mask
from prime_plugin.core.fsc_correction import CorrectedFsc, corrected_fsc, randomise_phases
from prime_plugin.core.masking import solvent_mask
from prime_plugin.core.postprocess import Postprocessed, postprocess
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.reconstruct import Backprojector, FourierSums, reconstruct_volume
from prime_plugin.core.refine import RefineParameters, RefineResult, refine
from prime_plugin.core.resample import resample_volume
from prime_plugin.core.simulate import simulate_particles
from prime_plugin.core.star import ParticleTable, read_particles, read_star_blocks, write_particles, write_star_blocks
from prime_plugin.core.star_reconstruction import reconstruct_particles
from prime_plugin.core.symmetry import symmetry_operators, symmetry_order
from prime_plugin.core.symmetry_search import SymmetryAlignment, find_symmetry_axes

__all__ = [
    "PrimeInputError",
    "ParticleTable",
    "read_particles",
    "write_particles",
    "read_star_blocks",
    "write_star_blocks",
    "ParticleImages",
    "read_volume",
    "write_volume",
    "euler_to_matrix",
    "matrix_to_euler",
    "projection_direction",
    "symmetry_operators",
    "symmetry_order",
    "SymmetryAlignment",
    "find_symmetry_axes",
    "asymmetric_unit_directions",
    "directions_for_count",
    "CtfParams",
    "ctf_at",
    "ctf_image",
    "electron_wavelength_A",
    "FourierProjector",
    "Backprojector",
    "FourierSums",
    "reconstruct_volume",
    "reconstruct_particles",
    "RefineParameters",
    "RefineResult",
    "refine",
    "simulate_particles",
    "resample_volume",
    "fsc",
    "resolution_at",
    "low_pass",
    "soft_sphere_mask",
    "CorrectedFsc",
    "corrected_fsc",
    "randomise_phases",
    "solvent_mask",
    "Postprocessed",
    "postprocess",
]
