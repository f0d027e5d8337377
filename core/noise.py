"""Noise power per Fourier ring and noise group, and the ring weights of the search (ALGORITHM.md section 11).

Real images carry coloured noise (several times more power at low frequencies than at
high ones on EMPIAR-10204, and different from micrograph to micrograph). The search
correlates each particle with the references ring by ring; dividing ring k's terms by the
noise power sigma2(k) of the particle's group turns the normalised correlation into the
profile of a Gaussian log-likelihood with a fitted particle scale (SIMPLE's ``euclid``
objective, RELION's likelihood), so that low rings dominated by ice and background no
longer outweigh the rings that place the particle.

Noise groups: one per micrograph (``rlnMicrographName``) when the STAR file names them,
else one per optics group. A micrograph with few particles is shrunk towards its optics
group's estimate (:data:`SHRINK_PARTICLES` particles' worth of it).

Units: sigma2 is in the units of the polar sections the search correlates (the mean of
|X(k, phi)|^2 over a ring of the normalised, soft-masked image's polar transform,
:func:`~prime_plugin.core.polar.particle_sections` without CTF), indexed by the ring's
radius in Fourier pixels (0 .. N/2 - 1). Two estimates:

- before any alignment, the rings' total power (signal plus noise: it overestimates the
  noise by the ring's SNR, a few per cent to 25% on real data at low rings);
- once orientations exist, the residual power |X - a CTF Y|^2 at each particle's best
  orientation, a its least-squares scale (:func:`residual_ring_power`), which replaces the
  first estimate on the rings aligned.
"""

from dataclasses import dataclass

import numpy as np

from prime_plugin.core.polar import PolarGrid, normalise_and_mask, particle_sections

__all__ = ["NoiseModel", "first_estimate", "fit_to_reference", "noise_groups", "residual_ring_power",
           "ring_total_power"]

SHRINK_PARTICLES = 20.0  # a group's estimate weighs like this many particles of its optics group's
MAX_PARTICLES_PER_GROUP = 100  # particles read per group for the first estimate (spread over the group) ...
MAX_PARTICLES_FIRST_ESTIMATE = 20000  # ... and in all (groups left unread take their optics group's estimate)
FIRST_RING = 1


def noise_groups(table):
    """Noise group of every particle, int64 (n,), and the optics group of every noise group, int64 (G,).

    One group per micrograph when ``rlnMicrographName`` is present, else per optics group.
    Groups are numbered in order of first appearance.
    """
    particles = table.particles
    optics = particles["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in particles else np.ones(len(particles))
    key = particles["rlnMicrographName"].astype(str).to_numpy() if "rlnMicrographName" in particles else optics
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # number groups by first appearance
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    group = renumber[group.ravel()]
    _, optics_index = np.unique(optics, return_inverse=True)
    return group.astype(np.int64), optics_index.ravel()[first[order]].astype(np.int64)


def ring_total_power(images, grid, mask_radius_px, edge_px):
    """Mean |X(k, phi)|^2 over each ring of the normalised, soft-masked images, float64 (P, K).

    images : float32 (P, N, N) as read; grid : PolarGrid of the rings wanted (no CTF applied).
    """
    masked = normalise_and_mask(normalise_and_mask(images, mask_radius_px, edge_px, mask=False), mask_radius_px,
                                edge_px)
    sections = particle_sections(masked, grid).sections
    return (np.abs(sections.astype(np.complex128)) ** 2).mean(axis=-1)


def fit_to_reference(sections, ctf_values, reference_rings, ring_weights=None):
    """Each particle's contrast scale against its reference and its residual ring power.

    sections : (P, K, h) the particles' polar half rings, centred, without CTF or weights;
    ctf_values : (P, K, h) the CTF at those points (ones without CTF); reference_rings :
    (P, K, h) each particle's reference at its best orientation (rotated to its psi);
    ring_weights : (P, K) 1 / noise power, or None. Returns the scale a float64 (P,), the
    weighted least-squares fit of X ~ a CTF Y, and the mean |X - a CTF Y|^2 over each ring,
    float64 (P, K).
    """
    model = ctf_values * reference_rings
    weights = np.ones(sections.shape[:2]) if ring_weights is None else np.asarray(ring_weights, np.float64)
    scale = ((weights[:, :, None] * np.real(sections * np.conj(model))).sum(axis=(1, 2))
             / np.maximum((weights[:, :, None] * np.abs(model) ** 2).sum(axis=(1, 2)), 1e-30))
    residual = sections - scale[:, None, None] * model
    return scale, (np.abs(residual.astype(np.complex128)) ** 2).mean(axis=-1)


def residual_ring_power(sections, ctf_values, reference_rings):
    """Mean |X - a CTF Y|^2 over each ring, float64 (P, K), with a each particle's least-squares scale
    (:func:`fit_to_reference` without weights)."""
    return fit_to_reference(sections, ctf_values, reference_rings)[1]


@dataclass
class NoiseModel:
    """sigma2 per noise group and ring, kept as running sums so that it follows incremental learning.

    group_of_particle : int64 (n,); optics_of_group : int64 (G,); sums : float64 (G, R), R = N // 2
    rings (index = radius in Fourier pixels), the summed ring power of the particles measured;
    particles : float64 (G, R), how many particles each sum holds (both decayed like the Fourier
    sums, by 1 - update fraction per iteration, on the rings measured). sigma2 = sums / particles;
    rings never measured take the nearest measured ring's value.
    """

    group_of_particle: np.ndarray
    optics_of_group: np.ndarray
    sums: np.ndarray
    particles: np.ndarray

    @classmethod
    def empty(cls, group_of_particle, optics_of_group, box):
        n_groups, rings = len(optics_of_group), box // 2
        return cls(np.asarray(group_of_particle, np.int64), np.asarray(optics_of_group, np.int64),
                   np.zeros((n_groups, rings)), np.zeros((n_groups, rings)))

    @property
    def n_groups(self):
        return len(self.optics_of_group)

    def add(self, rows, ring_power, rings, keep=1.0):
        """Blend in the ring powers (P, K) of particles ``rows`` on rings ``rings`` (int (K,)): the old sums of
        those rings are first multiplied by ``keep`` (1 - update fraction)."""
        rings = np.asarray(rings, np.int64)
        self.sums[:, rings] *= keep
        self.particles[:, rings] *= keep
        groups = self.group_of_particle[rows]
        np.add.at(self.sums, (groups[:, None], rings[None, :]), ring_power)
        np.add.at(self.particles, (groups[:, None], rings[None, :]), 1.0)

    def power(self):
        """sigma2 (G, R): each group's mean pulled towards its optics group's in proportion to how few
        particles it rests on (:data:`SHRINK_PARTICLES`); unmeasured rings filled from the nearest."""
        n_optics = int(self.optics_of_group.max()) + 1
        optics_sums = np.zeros((n_optics, self.sums.shape[1]))
        optics_particles = np.zeros_like(optics_sums)
        np.add.at(optics_sums, self.optics_of_group, self.sums)
        np.add.at(optics_particles, self.optics_of_group, self.particles)
        with np.errstate(invalid="ignore", divide="ignore"):
            prior = (optics_sums / optics_particles)[self.optics_of_group]
            power = (self.sums + SHRINK_PARTICLES * prior) / (self.particles + SHRINK_PARTICLES)
        return _fill_missing_rings(np.where(self.particles > 0, power, np.nan))

    def ring_weights(self, rows, rings):
        """Search weights 1 / sigma2, float32 (P, K), of particles ``rows`` on rings ``rings`` (int (K,)),
        scaled so that their median over the model is 1 (only their ratios matter)."""
        power = self.power()
        return (np.median(power) / power[self.group_of_particle[rows]][:, rings]).astype(np.float32)


def _fill_missing_rings(power):
    """Rings without an estimate (NaN) take the value of the nearest ring that has one, per row."""
    out = np.array(power)
    for row in out:
        known = np.flatnonzero(np.isfinite(row))
        if known.size == 0:  # a group of an optics group never measured
            row[:] = np.nan
            continue
        nearest = known[np.abs(np.arange(len(row))[:, None] - known[None, :]).argmin(axis=1)]
        row[:] = row[nearest]
    return out


def first_estimate(model, images, mask_radius_px, edge_px, rng):
    """Fill ``model`` from the total ring power of up to MAX_PARTICLES_PER_GROUP particles of each group
    (fewer, and not every group, beyond MAX_PARTICLES_FIRST_ESTIMATE particles in all).

    images : ParticleImages. Rings FIRST_RING .. N/2 - 1.
    """
    box = images.box
    grid = PolarGrid(box, FIRST_RING, box // 2 - 1, model_n_rot(box))
    per_group = max(1, min(MAX_PARTICLES_PER_GROUP, MAX_PARTICLES_FIRST_ESTIMATE // model.n_groups))
    order = np.argsort(model.group_of_particle, kind="stable")
    starts = np.searchsorted(model.group_of_particle[order], np.arange(model.n_groups + 1))
    rows = []
    for g in rng.permutation(model.n_groups)[:max(1, MAX_PARTICLES_FIRST_ESTIMATE // per_group)]:
        members = order[starts[g]:starts[g + 1]]
        if len(members) > per_group:
            members = rng.choice(members, per_group, replace=False)
        rows.append(np.sort(members))
    rings = np.arange(FIRST_RING, box // 2)
    for part, data in images.chunks(512, np.concatenate(rows)):
        model.add(part, ring_total_power(data, grid, mask_radius_px, edge_px), rings)


def model_n_rot(box):
    """Angles per ring for the noise estimate: enough samples on the outer ring (about 2 pi N / 2)."""
    return int(2 * np.ceil(np.pi * box / 2))
