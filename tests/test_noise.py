"""The noise model: ring noise power on images of known coloured noise, the residual estimate, the
groups, the weighted objective's origin gradient, and the weighted search on relion_project images
with coloured noise and CTF."""

import numpy as np
import pandas as pd
import pytest

from prime_plugin.core.directions import asymmetric_unit_directions
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.noise import NoiseModel, noise_groups, residual_ring_power, ring_total_power
from prime_plugin.core.polar import PolarGrid, default_n_rot, normalise_and_mask, particle_sections, polar_ctf
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.search import PolarReferences, search_particles
from prime_plugin.core.shifts import rotated_half_rings, shift_objective
from prime_plugin.core.star import ParticleTable
from relion_datasets import astigmatic_defocus, random_poses, relion_projections

BOX, PIXEL, MASK, EDGE = 64, 5.0, 28.0, 4.0


def noise_spectrum(box):
    """A smooth coloured spectrum S(k) on the image's rfft grid (power falls 8x from low to high
    frequency, like the real EMPIAR-10204 data) and the function itself."""
    def power(k):
        return 1.0 + 7.0 * np.exp(-(k / 8.0) ** 2)

    ky = np.fft.fftfreq(box, 1.0 / box)
    kx = np.arange(box // 2 + 1)
    return power(np.hypot(ky[:, None], kx[None, :])), power


def coloured_noise(n, box, seed):
    """Stationary Gaussian noise images (n, box, box) whose power spectrum is noise_spectrum."""
    spectrum, _ = noise_spectrum(box)
    white = np.random.default_rng(seed).standard_normal((n, box, box))
    return np.fft.irfft2(np.fft.rfft2(white) * np.sqrt(spectrum), s=(box, box)).astype(np.float32)


def test_total_power_of_coloured_noise_has_its_spectrum_shape():
    """On pure coloured noise the estimate (normalised, soft-masked images, polar units) is the known
    spectrum up to one scale factor: the ratio is the same on every ring to within 5%."""
    images = coloured_noise(600, BOX, seed=1)
    grid = PolarGrid(BOX, 1, BOX // 2 - 1, 2 * int(np.ceil(np.pi * BOX / 2)))
    estimate = ring_total_power(images, grid, MASK, EDGE).mean(axis=0)
    _, power = noise_spectrum(BOX)
    ratio = estimate / power(grid.rings)
    rings = grid.rings >= 3  # the soft mask's transform (a few px wide) blurs the lowest rings
    relative = ratio[rings] / np.median(ratio[rings])
    assert np.abs(relative - 1).max() < 0.05, np.round(relative, 3)


def test_residual_power_recovers_the_noise_under_signal_and_ctf():
    """Images = scale * CTF * Y + noise of known ring power: the residual estimate (with the true
    reference and the scale fitted) recovers the noise power per ring within 5%."""
    rng = np.random.default_rng(2)
    P, K, h = 400, 20, 48
    sigma2 = np.linspace(5.0, 1.0, K)  # per complex sample, falling with k
    reference = (rng.normal(size=(P, K, h)) + 1j * rng.normal(size=(P, K, h))) * 2.0
    ctf = np.cos(np.linspace(0, 6, K))[None, :, None] * np.ones((P, K, h))
    noise = (rng.normal(size=(P, K, h)) + 1j * rng.normal(size=(P, K, h))) * np.sqrt(sigma2 / 2)[None, :, None]
    images = 1.7 * ctf * reference + noise
    estimate = residual_ring_power(images, ctf, reference).mean(axis=0)
    np.testing.assert_allclose(estimate, sigma2, rtol=0.05)
    # without the reference, the signal stays in the residual wherever the CTF passes it
    strong = np.abs(ctf[0, :, 0]) > 0.5
    assert (residual_ring_power(images, ctf, np.zeros_like(reference)).mean(0)[strong] > 1.5 * sigma2[strong]).all()


def test_noise_groups_follow_micrographs_else_optics_groups():
    particles = pd.DataFrame({"rlnMicrographName": ["b", "a", "b", "c", "a"], "rlnOpticsGroup": [2, 1, 2, 1, 1]})
    table = ParticleTable(particles, pd.DataFrame({"rlnOpticsGroup": [1, 2]}))
    group, optics = noise_groups(table)
    np.testing.assert_array_equal(group, [0, 1, 0, 2, 1])  # numbered by first appearance
    np.testing.assert_array_equal(optics, [1, 0, 0])
    group, optics = noise_groups(ParticleTable(particles.drop(columns="rlnMicrographName"), table.optics))
    np.testing.assert_array_equal(group, [0, 1, 0, 1, 1])


def test_running_sums_blend_and_shrink_small_groups():
    """The estimate is the mean of what was added; decaying old sums by ``keep`` weighs new values in; a
    group resting on few particles is pulled towards its optics group's mean."""
    model = NoiseModel.empty(np.array([0, 0, 1]), np.array([0, 0]), box=8)
    rings = np.arange(1, 4)
    model.add(np.array([0, 1]), np.full((2, 3), 2.0), rings)
    model.add(np.array([2]), np.full((1, 3), 4.0), rings)
    power = model.power()
    # group 0: 2 particles at 2.0, prior (optics mean) 8/3; shrinkage with 20 particles' weight
    expected_0 = (2 * 2.0 + 20 * 8.0 / 3) / 22
    np.testing.assert_allclose(power[0, rings], expected_0)
    np.testing.assert_allclose(power[:, 0], power[:, 1])  # the unmeasured ring 0 takes ring 1's value
    model.add(np.array([0, 1]), np.full((2, 3), 6.0), rings, keep=0.5)
    assert model.sums[0, 1] == pytest.approx(0.5 * 4.0 + 12.0) and model.particles[0, 1] == pytest.approx(3.0)
    weights = model.ring_weights(np.array([0, 2]), rings)
    np.testing.assert_allclose(weights[0] / weights[1], model.power()[1, rings] / model.power()[0, rings], rtol=1e-6)


def test_weighted_origin_gradient_equals_finite_differences():
    """The origin objective of ring-weighted sections: its analytical gradient against central differences."""
    rng = np.random.default_rng(3)
    grid = PolarGrid(BOX, 2, 24, 96)
    images = normalise_and_mask(rng.normal(size=(1, BOX, BOX)).astype(np.float32), MASK)
    weights = rng.uniform(0.2, 3.0, (1, len(grid.rings))).astype(np.float32)
    X = particle_sections(images, grid, ring_weights=weights).sections[0]
    Y = (rng.normal(size=X.shape) + 1j * rng.normal(size=X.shape)).astype(np.complex64)
    t_x, t_y = grid.shift_factors()
    objective = shift_objective(rotated_half_rings(Y, 11) * np.conj(X), t_x, t_y, norm=1e3)
    for s in rng.uniform(-3, 3, (5, 2)):
        _, grad = objective(s)
        h = 1e-5
        numeric = [(objective(s + h * e)[0] - objective(s - h * e)[0]) / (2 * h) for e in np.eye(2)]
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-9 * np.abs(grad).max())


def test_weights_scale_the_rings_of_sections_powers_and_ctf2():
    rng = np.random.default_rng(4)
    grid = PolarGrid(BOX, 2, 20, 64)
    images = normalise_and_mask(rng.normal(size=(3, BOX, BOX)).astype(np.float32), MASK)
    weights = rng.uniform(0.5, 2.0, (3, len(grid.rings))).astype(np.float32)
    plain = particle_sections(images, grid)
    weighted = particle_sections(images, grid, ring_weights=weights)
    np.testing.assert_allclose(weighted.sections, plain.sections * weights[:, :, None], rtol=1e-6)
    np.testing.assert_allclose(weighted.powers, plain.powers * weights, rtol=1e-6)
    np.testing.assert_allclose(weighted.ctf2, weights, rtol=1e-6)


def angular_errors(true_angles, result, references, grid):
    d = references.directions_deg[result.direction]
    found = euler_to_matrix(d[:, 0], d[:, 1], result.psi_index * grid.psi_step_deg)
    true = euler_to_matrix(*true_angles.T)
    cosine = (np.trace(np.einsum("nij,nkj->nik", true, found), axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


@pytest.mark.relion
def test_weighted_search_recovers_more_orientations_in_coloured_noise(ribosome, tmp_path, relion):
    """relion_project images (CTF 1-3 um) in strong low-frequency noise: whitening each ring by the
    noise power estimated from the images themselves places more particles within one grid step."""
    n = 300
    angles, origins = random_poses(n, seed=21, max_shift_px=0.0)
    data = relion_projections(relion, tmp_path, ribosome, PIXEL, angles, origins, astigmatic_defocus(n, seed=22))
    noise = coloured_noise(n, BOX, seed=23)
    spectrum, _ = noise_spectrum(BOX)
    white_equivalent = np.sqrt(data.clean.var(axis=(1, 2)).mean() / 0.05 / spectrum.mean())
    images = data.clean + white_equivalent * noise  # SNR 0.05 over the box, most noise power at low k
    directions, step = asymmetric_unit_directions("C1", 5.0)
    grid = PolarGrid(BOX, 2, 18, default_n_rot(MASK))
    references = PolarReferences.from_projector(FourierProjector(ribosome), directions, grid)
    masked = normalise_and_mask(images, MASK, EDGE)
    ctf = data.ctf()
    model = NoiseModel.empty(np.zeros(n, np.int64), np.zeros(1, np.int64), BOX)
    model.add(np.arange(n), ring_total_power(images, grid, MASK, EDGE), grid.rings.astype(int))
    within = {}
    for name, weights in (("plain", None), ("weighted", model.ring_weights(np.arange(n), grid.rings.astype(int)))):
        particles = particle_sections(masked, grid, ctf=ctf, pixel_size_A=PIXEL, ring_weights=weights)
        result = search_particles(references, particles, grid, np.zeros((n, 2)), np.random.default_rng(0))
        within[name] = angular_errors(data.angles_deg, result, references, grid) <= step
    # paired (McNemar): particles only the weighted search places, against those only the plain one does
    gained = int((within["weighted"] & ~within["plain"]).sum())
    lost = int((within["plain"] & ~within["weighted"]).sum())
    assert within["weighted"].mean() > within["plain"].mean(), (within["weighted"].mean(), within["plain"].mean())
    assert gained - lost > 2.5 * np.sqrt(gained + lost), (gained, lost)
    # the CTF values the residual estimate uses are those the sections were multiplied by
    plain = particle_sections(masked[:5], grid)
    with_ctf = particle_sections(masked[:5], grid, ctf=ctf.take(np.arange(5)), pixel_size_A=PIXEL)
    np.testing.assert_allclose(with_ctf.sections, plain.sections * polar_ctf(ctf.take(np.arange(5)), grid, PIXEL),
                               rtol=1e-5, atol=1e-6 * np.abs(plain.sections).max())
