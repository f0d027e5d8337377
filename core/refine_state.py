"""The state of a refinement between iterations, and its checkpoint on disk.

Per particle (arrays of length n, the only memory that grows with the data set):
the half-set, the current best orientation (direction index, in-plane index, Euler
angles, origin), the n_peaks orientations with their weights, the correlation, how
often and when it was last searched, the fraction of the search space its last
search visited, and the working box its insertion in the sums was made at
(:mod:`~prime_plugin.core.working_box`; 0: not inserted). Per half-set: the Fourier
sums U and rho, at the current working box. Per iteration: the figures
of the convergence report.

A checkpoint is the sums of both halves plus one .npz of everything else, each
written atomically; the state file is written last and names its iteration, so the
last complete iteration is always the one the state file names.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prime_plugin.core.atomic_files import atomic_output
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.noise import NoiseModel
from prime_plugin.core.reconstruct import FourierSums

STATE_NAME = "checkpoint_state.npz"
PER_PARTICLE = ("half", "direction", "psi_index", "angles_deg", "shift_px", "correlation", "update_count",
                "last_update", "fraction_visited", "peak_directions", "peak_psi", "peak_angles_deg",
                "peak_weights", "peak_correlations", "scale", "inserted_box")


@dataclass
class RefineState:
    """Everything a refinement carries from one iteration to the next (see module docstring)."""

    iteration: int
    ring_limit: int
    half: np.ndarray
    direction: np.ndarray
    psi_index: np.ndarray
    angles_deg: np.ndarray
    shift_px: np.ndarray
    correlation: np.ndarray
    update_count: np.ndarray
    last_update: np.ndarray
    fraction_visited: np.ndarray
    peak_directions: np.ndarray
    peak_psi: np.ndarray
    peak_angles_deg: np.ndarray
    peak_weights: np.ndarray
    peak_correlations: np.ndarray
    scale: np.ndarray
    inserted_box: np.ndarray = None
    sums: list = field(default_factory=list)
    history: list = field(default_factory=list)
    noise: object = None  # a NoiseModel, or None when the search is unweighted

    @classmethod
    def start(cls, half, angles_deg, shift_px, n_peaks, ring_limit, box, padding=2.0):
        """A state before the first iteration: given angles (or NaN when unknown) and shifts; empty sums
        of ``box`` (the first working box)."""
        n = len(half)
        return cls(iteration=0, ring_limit=ring_limit, half=np.asarray(half, np.int64),
                   direction=np.full(n, -1, np.int64), psi_index=np.zeros(n, np.int64),
                   angles_deg=np.asarray(angles_deg, np.float64), shift_px=np.asarray(shift_px, np.float64),
                   correlation=np.zeros(n), update_count=np.zeros(n, np.int64), last_update=np.zeros(n, np.int64),
                   fraction_visited=np.zeros(n), peak_directions=np.full((n, n_peaks), -1, np.int64),
                   peak_psi=np.zeros((n, n_peaks), np.int64), peak_angles_deg=np.zeros((n, n_peaks, 3)),
                   peak_weights=np.zeros((n, n_peaks)), peak_correlations=np.zeros((n, n_peaks)), scale=np.ones(n),
                   inserted_box=np.zeros(n, np.int64),
                   sums=[FourierSums.zeros(box, padding), FourierSums.zeros(box, padding)])

    def save(self, folder):
        """Write the checkpoint of the current iteration into ``folder`` (sums first, state last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for h, sums in enumerate(self.sums, start=1):
            sums.save(folder / f"checkpoint_half{h}_it{self.iteration:03d}.npz")
        arrays = {name: getattr(self, name) for name in PER_PARTICLE}
        if self.noise is not None:
            arrays.update(noise_group=self.noise.group_of_particle, noise_optics=self.noise.optics_of_group,
                          noise_sums=self.noise.sums, noise_particles=self.noise.particles)
        with atomic_output(folder / STATE_NAME) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, iteration=self.iteration, ring_limit=self.ring_limit,
                         history=json.dumps(self.history), **arrays)
        for old in folder.glob("checkpoint_half*_it*.npz"):
            if not old.name.endswith(f"_it{self.iteration:03d}.npz"):
                old.unlink()

    @classmethod
    def load(cls, folder):
        """The state of the last complete iteration saved in ``folder``."""
        folder = Path(folder)
        path = folder / STATE_NAME
        if not path.is_file():
            raise PrimeInputError("no checkpoint to continue from (run without --continue)", folder)
        with np.load(path) as saved:
            values = {name: saved[name] for name in PER_PARTICLE if name in saved}
            iteration = int(saved["iteration"])
            state = cls(iteration=iteration, ring_limit=int(saved["ring_limit"]),
                        history=json.loads(str(saved["history"])), **values)
            if "noise_sums" in saved:
                state.noise = NoiseModel(saved["noise_group"], saved["noise_optics"], saved["noise_sums"],
                                         saved["noise_particles"])
        state.sums = [FourierSums.load(folder / f"checkpoint_half{h}_it{iteration:03d}.npz") for h in (1, 2)]
        if state.inserted_box is None:  # a checkpoint of the releases that inserted at the full box only
            state.inserted_box = np.where(state.update_count > 0, state.sums[0].box, 0).astype(np.int64)
        return state


def select_update_set(state, fraction, rng):
    """Rows to search this iteration: the nint(fraction * n) least often, then least recently, updated.

    Ties are broken by a random order from ``rng`` (seeded per iteration). Returns sorted int64 rows.
    """
    n = len(state.half)
    count = max(1, min(n, int(round(fraction * n))))
    tie_break = rng.permutation(n)
    order = np.lexsort((tie_break, state.last_update, state.update_count))
    return np.sort(order[:count])
