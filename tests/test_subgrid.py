"""Sub-grid refinement of the best orientation (core.subgrid).

Oracles: an exact quadratic (the fit must return its analytical maximum), brute force over
the symmetry group, and relion_project images with known orientations (clean, noisy,
and of a D2 map), where the refined orientations must be closer to the truth than the
grid's best.
"""

import mrcfile
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from prime_plugin.core.directions import asymmetric_unit_directions, direction_neighbours
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.polar import PolarGrid, default_n_rot, normalise_and_mask, particle_sections
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.search import PolarReferences, search_particles
from prime_plugin.core.subgrid import nearest_mates, quadratic_peaks
from prime_plugin.core.symmetry import symmetry_operators
from relion_datasets import astigmatic_defocus, random_poses, relion_projections

BOX, PIXEL, MASK = 64, 5.0, 28


def test_quadratic_fit_returns_the_analytical_maximum():
    rng = np.random.default_rng(0)
    n = 50
    q = Rotation.random(n, random_state=1).as_matrix()
    hessian = -np.einsum("pij,pj,pkj->pik", q, rng.uniform(0.5, 3.0, (n, 3)), q)   # negative definite
    true_peak = rng.uniform(-0.5, 0.5, (n, 3))
    top = rng.normal(size=n)
    w = rng.uniform(-1, 1, (n, 27, 3))
    d = w - true_peak[:, None]
    values = top[:, None] + 0.5 * np.einsum("psi,pij,psj->ps", d, hessian, d)
    peak, value, accepted = quadratic_peaks(w, values, radius=1.0)
    assert accepted.all()
    np.testing.assert_allclose(peak, true_peak, atol=1e-9)
    np.testing.assert_allclose(value, top, atol=1e-9)


def test_quadratic_fit_refuses_saddles_and_far_peaks():
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, (3, 27, 3))
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    saddle = -(x ** 2) + y ** 2 - z ** 2
    far = -((x - 3.0) ** 2 + y ** 2 + z ** 2)        # maximum at distance 3 > radius 1
    bowl = x ** 2 + y ** 2 + z ** 2                  # a minimum, no maximum
    peak, value, accepted = quadratic_peaks(w, np.stack([saddle[0], far[1], bowl[2]]), radius=1.0)
    assert not accepted.any()
    np.testing.assert_array_equal(peak, 0.0)


def test_nearest_mate_is_the_brute_force_nearest():
    ops = symmetry_operators("D7")
    centre = Rotation.random(20, random_state=4).as_matrix()
    rotations = Rotation.random(20 * 5, random_state=5).as_matrix().reshape(20, 5, 3, 3)
    picked = nearest_mates(rotations, centre, ops)
    for p in range(20):
        for c in range(5):
            angles = [np.arccos(np.clip((np.trace(rotations[p, c] @ s @ centre[p].T) - 1) / 2, -1, 1)) for s in ops]
            best = ops[int(np.argmin(angles))]
            np.testing.assert_allclose(picked[p, c], rotations[p, c] @ best, atol=1e-12)


# ------------------------------------------------------------ relion_project images with known orientations

def symmetric_errors(true_angles, found_angles, ops):
    """Smallest angle (deg) between the true rotation and any symmetry mate of the found one."""
    true = euler_to_matrix(*np.asarray(true_angles).T)
    found = euler_to_matrix(*np.asarray(found_angles).T)
    mates = np.einsum("nij,sjk->nsik", found, ops)
    cosine = (np.einsum("nsij,nij->ns", mates, true) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine.max(axis=1), -1, 1)))


def assert_never_leaves_the_step(grid_error, refined_error, step):
    """Where the grid's best is within a step of the truth, so is the refined orientation
    (the few grid misses, near-symmetric views, are not the fit's to mend)."""
    found = grid_error <= step
    assert found.mean() >= 0.95
    assert (refined_error[found] <= step).all(), np.sort(refined_error[found])[-5:]


def grid_angles(result, references, grid):
    d = references.directions_deg[result.direction]
    return np.column_stack([d[:, 0], d[:, 1], result.psi_index * grid.psi_step_deg])


def search_both_ways(volume, symmetry, images, ctf, rings, step_deg):
    """Exhaustive search of ``images`` on a ``step_deg`` grid: (grid angles, sub-grid angles, ops)."""
    ops = symmetry_operators(symmetry)
    directions, step = asymmetric_unit_directions(symmetry, step_deg)
    neighbours = direction_neighbours(directions, ops)
    grid = PolarGrid(BOX, 2, rings, default_n_rot(MASK))
    references = PolarReferences.from_projector(FourierProjector(volume), directions, grid)
    particles = particle_sections(normalise_and_mask(images, MASK), grid, ctf=ctf, pixel_size_A=PIXEL)
    result = search_particles(references, particles, grid, np.zeros((len(images), 2)), np.random.default_rng(0),
                              trs_px=4.5, shift_step_px=2.0, neighbours=neighbours,
                              subgrid=(ops, step))
    return grid_angles(result, references, grid), result.best_angles_deg, ops, step


@pytest.fixture(scope="module")
def clean_ribosome(ribosome, tmp_path_factory, relion):
    angles, origins = random_poses(200, seed=21, max_shift_px=4.0)
    return relion_projections(relion, tmp_path_factory.mktemp("subgrid_clean"), ribosome, PIXEL, angles, origins)


@pytest.mark.relion
def test_clean_images_land_between_the_grid_points(ribosome, clean_ribosome):
    """Noise-free: the grid's best is off by about a third of the step; the fit must cut that at least in half."""
    on_grid, refined, ops, step = search_both_ways(ribosome, "C1", clean_ribosome.clean, None, 28, 6.0)
    grid_error = symmetric_errors(clean_ribosome.angles_deg, on_grid, ops)
    refined_error = symmetric_errors(clean_ribosome.angles_deg, refined, ops)
    assert np.median(refined_error) < 0.5 * np.median(grid_error), (np.median(grid_error), np.median(refined_error))
    assert np.percentile(refined_error, 90) < np.percentile(grid_error, 90)
    assert_never_leaves_the_step(grid_error, refined_error, step)


@pytest.mark.relion
def test_noisy_ctf_images_are_closer_to_the_truth(ribosome, tmp_path_factory, relion):
    """SNR 0.1 with astigmatic CTFs, the alignment limited to 16 A as in a refinement."""
    angles, origins = random_poses(300, seed=22, max_shift_px=4.0)
    data = relion_projections(relion, tmp_path_factory.mktemp("subgrid_noisy"), ribosome, PIXEL, angles, origins,
                              astigmatic_defocus(300, seed=6))
    on_grid, refined, ops, _ = search_both_ways(ribosome, "C1", data.noisy(0.1, seed=7), data.ctf(), 18, 6.0)
    grid_error = symmetric_errors(data.angles_deg, on_grid, ops)
    refined_error = symmetric_errors(data.angles_deg, refined, ops)
    assert np.median(refined_error) < 0.65 * np.median(grid_error), (np.median(grid_error), np.median(refined_error))


@pytest.mark.relion
def test_symmetric_map_near_asymmetric_unit_edges(shared_data, tmp_path_factory, relion):
    """D2 beta-galactosidase: neighbours across the asymmetric unit's edges are symmetry mates."""
    from importlib.resources import files
    volume = mrcfile.read(files("prime_plugin") / "data" / "betagal_d2_64.mrc").astype(np.float32)
    angles, origins = random_poses(200, seed=23, max_shift_px=3.0)
    data = relion_projections(relion, tmp_path_factory.mktemp("subgrid_d2"), volume, PIXEL, angles, origins)
    on_grid, refined, ops, step = search_both_ways(volume, "D2", data.clean, None, 28, 6.0)
    grid_error = symmetric_errors(data.angles_deg, on_grid, ops)
    refined_error = symmetric_errors(data.angles_deg, refined, ops)
    assert np.median(refined_error) < 0.5 * np.median(grid_error), (np.median(grid_error), np.median(refined_error))
    assert_never_leaves_the_step(grid_error, refined_error, step)
