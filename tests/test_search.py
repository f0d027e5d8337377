"""The polar search engine: brute-force correlation, the Friedel path, the shift gradient,
and recovery of known orientations from relion_project images."""

import numpy as np
import pytest
import scipy.optimize

from prime_plugin.core.correlate import (best_rotations, normalisers, ring_powers, ring_spectra,
                                         rotational_correlations, rotational_correlations_complex, transform_work)
from prime_plugin.core.directions import asymmetric_unit_directions
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.polar import PolarGrid, default_n_rot, normalise_and_mask, particle_sections
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.search import PolarReferences, search_particles, softmax_weights
from prime_plugin.core.shifts import refine_shift, rotated_half_rings, shift_objective
from relion_datasets import astigmatic_defocus, perturbed_poses, random_poses, relion_projections


def random_sections(rng, n, rings, n_half):
    return (rng.normal(size=(n, rings, n_half)) + 1j * rng.normal(size=(n, rings, n_half))).astype(np.complex64)


def brute_force(references, particles, ctf2, n_rot):
    """lambda_m by the defining sum over full rings, in float64."""
    def full(s):
        return np.concatenate([s, np.conj(s)], axis=-1).astype(np.complex128)
    Y, X = full(references), full(particles)
    out = np.empty((len(Y), len(X), n_rot))
    for m in range(n_rot):
        rolled = np.roll(Y, -m, axis=-1)  # Y(k, n + m)
        out[:, :, m] = np.einsum("rkn,pkn->rp", rolled, np.conj(X)).real
    power_y = (np.abs(Y) ** 2).sum(-1)
    power_x = (np.abs(X) ** 2).sum(-1)
    norms = np.sqrt((power_y @ ctf2.T) * power_x.sum(-1)[None, :])
    return out / norms[:, :, None]


@pytest.mark.parametrize("n_rot", [8, 30, 64])
@pytest.mark.parametrize("with_ctf", [False, True])
def test_correlation_equals_brute_force(n_rot, with_ctf):
    rng = np.random.default_rng(n_rot)
    rings = 7
    Y = random_sections(rng, 5, rings, n_rot // 2)
    X = random_sections(rng, 4, rings, n_rot // 2)
    ctf2 = rng.uniform(0.1, 1.0, (4, rings)).astype(np.float32) if with_ctf else np.ones((4, rings), np.float32)
    norms = normalisers(ring_powers(Y), ring_powers(X), ctf2 if with_ctf else None)
    fast = rotational_correlations(ring_spectra(Y), ring_spectra(X), norms, n_rot)
    slow = brute_force(Y, X, ctf2, n_rot)
    np.testing.assert_allclose(fast, slow, atol=2e-6 * np.abs(slow).max())
    index, best = best_rotations(ring_spectra(Y), ring_spectra(X), norms, n_rot)
    np.testing.assert_array_equal(index, slow.argmax(-1))
    np.testing.assert_allclose(best, slow.max(-1), atol=2e-6)


@pytest.mark.parametrize("n_rot", [8, 30])
def test_paired_curves_equal_brute_force(n_rot):
    """The local search's scoring (each particle against its own candidates, a numba kernel) against the
    brute-force correlation of every in-plane angle."""
    from prime_plugin.core.correlate import paired_curves

    rng = np.random.default_rng(n_rot + 1)
    rings, n_particles, n_candidates = 6, 3, 4
    Y = random_sections(rng, 7, rings, n_rot // 2)
    X = random_sections(rng, n_particles, rings, n_rot // 2)
    ctf2 = rng.uniform(0.1, 1.0, (n_particles, rings)).astype(np.float32)
    candidates = rng.integers(0, len(Y), (n_particles, n_candidates))
    spectra, powers = ring_spectra(Y), ring_powers(Y)
    fast = paired_curves(spectra[candidates], powers[candidates], ring_spectra(X), ring_powers(X), ctf2, n_rot)
    for p in range(n_particles):
        slow = brute_force(Y[candidates[p]], X[p:p + 1], ctf2[p:p + 1], n_rot)[:, 0]
        np.testing.assert_allclose(fast[p], slow, atol=2e-6 * np.abs(slow).max())


def test_friedel_path_equals_complex_path_and_saves_work():
    rng = np.random.default_rng(1)
    n_rot, rings = 256, 48
    Y = random_sections(rng, 6, rings, n_rot // 2)
    X = random_sections(rng, 5, rings, n_rot // 2)
    norms = normalisers(ring_powers(Y), ring_powers(X))
    friedel = rotational_correlations(ring_spectra(Y), ring_spectra(X), norms, n_rot)
    plain = rotational_correlations_complex(Y, X, norms)
    np.testing.assert_allclose(friedel, plain, atol=1e-5 * np.abs(plain).max())
    work = transform_work(n_rot, rings)
    assert work["saving_transform"] >= 0.25 and work["saving_matrix"] >= 0.25


def test_odd_n_rot_is_refused():
    with pytest.raises(ValueError, match="even"):
        PolarGrid(64, 2, 20, 91)


def test_shift_gradient_equals_finite_differences():
    rng = np.random.default_rng(2)
    grid = PolarGrid(64, 2, 24, 96)
    Y = random_sections(rng, 1, 23, 48)[0]
    X = random_sections(rng, 1, 23, 48)[0]
    t_x, t_y = grid.shift_factors()
    objective = shift_objective(rotated_half_rings(Y, 17) * np.conj(X), t_x, t_y, norm=1e3)
    for s in rng.uniform(-3, 3, (5, 2)):
        _, grad = objective(s)
        h = 1e-5
        numeric = [(objective(s + h * e)[0] - objective(s - h * e)[0]) / (2 * h) for e in np.eye(2)]
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-9 * np.abs(grad).max())


def test_softmax_weights():
    w = softmax_weights(np.array([[0.9, 0.895, 0.5, -0.1]]), sigma=0.005)
    assert w.sum() == pytest.approx(1.0)
    assert w[0, 1] / w[0, 0] == pytest.approx(np.exp(-1.0))
    assert w[0, 3] == 0.0


# ------------------------------------------------------------ recovery from relion_project images

BOX, PIXEL, MASK = 64, 5.0, 28


def angular_errors(true_angles, found_matrices):
    true = euler_to_matrix(*true_angles.T)
    cosine = (np.trace(np.einsum("nij,nkj->nik", true, found_matrices), axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


@pytest.fixture(scope="module")
def engine(ribosome):
    directions, step = asymmetric_unit_directions("C1", 5.0)
    grid = PolarGrid(BOX, 2, 28, default_n_rot(MASK))
    references = PolarReferences.from_projector(FourierProjector(ribosome), directions, grid)
    return references, grid, step


def found_matrices(result, references, grid):
    d = references.directions_deg[result.direction]
    return euler_to_matrix(d[:, 0], d[:, 1], result.psi_index * grid.psi_step_deg)


@pytest.fixture(scope="module")
def relion_clean(ribosome, tmp_path_factory, relion):
    angles, origins = random_poses(200, seed=11, max_shift_px=4.0)
    return relion_projections(relion, tmp_path_factory.mktemp("clean"), ribosome, PIXEL, angles, origins)


@pytest.mark.relion
def test_noise_free_exhaustive_search_recovers_orientations_and_shifts(relion_clean, engine):
    references, grid, step = engine
    particles = particle_sections(normalise_and_mask(relion_clean.clean, MASK), grid)
    result = search_particles(references, particles, grid, np.zeros((200, 2)),
                              np.random.default_rng(0), trs_px=4.5, shift_step_px=2.0)
    errors = angular_errors(relion_clean.angles_deg, found_matrices(result, references, grid))
    shift_errors = np.linalg.norm(result.shift_px - relion_clean.origins_px, axis=1)
    assert (errors <= step).mean() >= 0.98, np.sort(errors)[-10:]
    assert (shift_errors <= 0.5).mean() >= 0.98, np.sort(shift_errors)[-10:]


@pytest.fixture(scope="module")
def relion_noisy(ribosome, tmp_path_factory, relion):
    """200 relion_project images with astigmatic CTFs (1-3 um), shifts up to 4 px, SNR 0.1."""
    angles, origins = random_poses(200, seed=12, max_shift_px=4.0)
    data = relion_projections(relion, tmp_path_factory.mktemp("noisy"), ribosome, PIXEL, angles, origins,
                              astigmatic_defocus(200, seed=5))
    return data, data.noisy(0.1, seed=3), data.ctf()


@pytest.fixture(scope="module")
def noisy_engine(ribosome, engine, relion_noisy):
    """References and particles on rings 2..18 (16 A at 5 A/px), where the SNR 0.1 signal lives."""
    data, noisy, ctf = relion_noisy
    references, _, step = engine
    grid = PolarGrid(BOX, 2, 18, default_n_rot(MASK))
    references = PolarReferences.from_projector(FourierProjector(ribosome), references.directions_deg, grid)
    particles = particle_sections(normalise_and_mask(noisy, MASK), grid, ctf=ctf, pixel_size_A=PIXEL)
    return references, particles, grid, step


@pytest.fixture(scope="module")
def noisy_exhaustive(noisy_engine):
    references, particles, grid, _ = noisy_engine
    return search_particles(references, particles, grid, np.zeros((200, 2)), np.random.default_rng(0),
                            trs_px=4.5, shift_step_px=2.0)


@pytest.mark.relion
def test_noisy_ctf_search_recovers_most_orientations(relion_noisy, noisy_engine, noisy_exhaustive):
    data = relion_noisy[0]
    references, _, grid, step = noisy_engine
    errors = angular_errors(data.angles_deg, found_matrices(noisy_exhaustive, references, grid))
    assert (errors <= 2 * step).mean() >= 0.90, np.sort(errors)[-20:]


def perturbed_previous(angles_deg, references, grid, degrees, seed):
    """(direction index, psi index) nearest to each true orientation rotated by ``degrees`` about a random axis."""
    from prime_plugin.core.geometry import projection_direction

    rot, tilt, psi = perturbed_poses(angles_deg, np.zeros((len(angles_deg), 2)), degrees, 0.0, seed)[0].T
    grid_dirs = projection_direction(*references.directions_deg.T)
    direction = (projection_direction(rot, tilt) @ grid_dirs.T).argmax(axis=1)
    return direction, np.rint(psi / grid.psi_step_deg).astype(np.int64) % grid.n_rot


@pytest.mark.relion
def test_shc_from_perturbed_truth_visits_under_half_and_is_no_worse(relion_noisy, noisy_engine, noisy_exhaustive):
    data = relion_noisy[0]
    references, particles, grid, step = noisy_engine
    previous = perturbed_previous(data.angles_deg, references, grid, degrees=4.0, seed=9)
    from prime_plugin.core.directions import direction_neighbours
    from prime_plugin.core.symmetry import symmetry_operators

    neighbours = direction_neighbours(references.directions_deg, symmetry_operators("C1"))
    shc = search_particles(references, particles, grid, data.origins_px, np.random.default_rng(1),
                           previous=previous, trs_px=4.5, shift_step_px=2.0, neighbours=neighbours)
    shc_error = np.median(angular_errors(data.angles_deg, found_matrices(shc, references, grid)))
    greedy_error = np.median(angular_errors(data.angles_deg, found_matrices(noisy_exhaustive, references, grid)))
    assert shc.fraction_visited.mean() < 0.5
    assert shc_error <= 1.1 * greedy_error, (shc_error, greedy_error)


@pytest.mark.relion
def test_lbfgsb_ends_no_worse_than_nelder_mead(relion_noisy, noisy_engine):
    """At the true direction, from a zero start: L-BFGS-B's median correlation >= Nelder-Mead's."""
    data = relion_noisy[0]
    references, particles, grid, _ = noisy_engine
    grid_dirs = references.directions_deg
    from prime_plugin.core.geometry import projection_direction
    truth = (projection_direction(*data.angles_deg[:, :2].T) @ projection_direction(*grid_dirs.T).T).argmax(1)
    finals = {"L-BFGS-B": [], "Nelder-Mead": []}
    for i in range(40):
        j = truth[i]
        norm = float(np.sqrt((references.powers[j] * particles.ctf2[i]).sum()
                             * particles.powers[i].sum()))
        for method in finals:
            _, _, value, _ = refine_shift(references.sections[j], particles.sections[i], norm, grid,
                                          np.zeros(2), 4.5, method=method)
            finals[method].append(value)
    # Both converge on the same optimum; 1e-5 is the optimisers' own stopping tolerance.
    assert np.median(finals["L-BFGS-B"]) >= np.median(finals["Nelder-Mead"]) - 1e-5


def _brute_force_angles(centre_deg, directions_deg, n_rot, operators):
    """Angle (deg) from ``centre_deg`` (3,) to every grid orientation (direction, psi), (D, n_rot), over the mates."""
    from prime_plugin.core.geometry import rotation_angles_deg

    d = np.repeat(directions_deg, n_rot, axis=0)
    psi = np.tile(np.arange(n_rot) * 360.0 / n_rot, len(directions_deg))
    grid_rotations = euler_to_matrix(d[:, 0], d[:, 1], psi)
    centre = np.broadcast_to(euler_to_matrix(*centre_deg), grid_rotations.shape)
    return rotation_angles_deg(centre, grid_rotations, operators).reshape(len(directions_deg), n_rot)


@pytest.mark.parametrize("symmetry", ["C1", "D2"])
def test_local_window_holds_exactly_the_orientations_near_the_centre(symmetry):
    """Against the brute-force angle to every grid orientation over the symmetry mates: every orientation
    within the window is a candidate, and none beyond it (up to the kept nearest in-plane angle)."""
    from prime_plugin.core.local_search import local_candidates
    from prime_plugin.core.symmetry import symmetry_operators

    operators = symmetry_operators(symmetry)
    directions, _ = asymmetric_unit_directions(symmetry, 6.0)
    n_rot, window = 72, 10.0
    rng = np.random.default_rng(4)
    centres = np.column_stack([rng.uniform(-180, 180, 6), np.degrees(np.arccos(rng.uniform(-1, 1, 6))),
                               rng.uniform(-180, 180, 6)])
    candidates, allowed = local_candidates(centres, directions, operators, window, n_rot)
    for centre, cands, ok in zip(centres, candidates, allowed):
        angles = _brute_force_angles(centre, directions, n_rot, operators)
        ours = np.zeros_like(angles, bool)
        for direction, row in zip(cands, ok):
            ours[direction] |= row
        assert ours[angles <= window - 1e-6].all()
        assert (angles[ours] <= window + 360.0 / n_rot).all(), angles[ours].max()
        assert ours.sum() >= (angles <= window - 1e-6).sum() > 0


def test_local_window_smaller_than_the_grid_keeps_the_nearest_orientation():
    from prime_plugin.core.local_search import local_candidates
    from prime_plugin.core.symmetry import symmetry_operators

    operators = symmetry_operators("C1")
    directions, step = asymmetric_unit_directions("C1", 8.0)
    centres = np.array([[10.0, 50.0, 30.0], [-100.0, 120.0, 200.0]])
    candidates, allowed = local_candidates(centres, directions, operators, 0.01, 72)
    for centre, cands, ok in zip(centres, candidates, allowed):
        angles = _brute_force_angles(centre, directions, 72, operators)
        kept = [angles[d, m] for d, row in zip(cands, ok) for m in np.flatnonzero(row)]
        assert 1 <= len(kept) and min(kept) <= angles.min() + 1e-6


@pytest.mark.relion
def test_local_search_from_perturbed_truth_stays_near_and_matches_exhaustive(relion_noisy, noisy_engine,
                                                                             noisy_exhaustive):
    """Started 4 degrees from the truth, a local search (window 9 degrees) scores a few percent of the
    directions, ends no further from the truth than the exhaustive search (median), and never leaves
    its window by more than a grid step."""
    from prime_plugin.core.geometry import rotation_angles_deg
    from prime_plugin.core.symmetry import symmetry_operators

    data = relion_noisy[0]
    references, particles, grid, step = noisy_engine
    centres, origins = perturbed_poses(data.angles_deg, data.origins_px, 4.0, 1.5, seed=9)
    window = 9.0
    local = search_particles(references, particles, grid, origins, np.random.default_rng(1), trs_px=3.0,
                             shift_step_px=1.0,
                             local=(centres, symmetry_operators("C1"), window))
    found = found_matrices(local, references, grid)
    local_error = np.median(angular_errors(data.angles_deg, found))
    exhaustive_error = np.median(angular_errors(data.angles_deg, found_matrices(noisy_exhaustive, references, grid)))
    assert local_error <= 1.05 * exhaustive_error, (local_error, exhaustive_error)
    assert local_error < 0.6 * 4.0
    assert (rotation_angles_deg(euler_to_matrix(*centres.T), found) <= window + step).all()
    assert local.fraction_visited.mean() < 0.1
