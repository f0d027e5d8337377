"""Working at a Fourier-cropped box (core/working_box.py) against full-size computations.

Oracles: the discrete Fourier transform itself (a resized array's DFT equals the
original's at every kept frequency), insertion at the full box with the cropped
box's radius (sums made at a small box must be exactly the centre of a larger
box's), full-size polar transforms and reconstructions, and a refinement iteration
at the full box (noise-free data: the cropped search must find the same
orientations).
"""

import importlib

import numpy as np
import pytest
import scipy.fft
from prime_plugin.core.ctf import CtfParams
from prime_plugin.core.fourier import fsc, shell_index
from prime_plugin.core.geometry import euler_to_matrix, rotation_angles_deg
from prime_plugin.core.polar import PolarGrid, normalise_and_mask, polar_transforms
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.reconstruct import reconstruct_volume
from prime_plugin.core.refine import RefineParameters, refine
from prime_plugin.core.refine_tasks import InsertionSettings, insert_particles
from prime_plugin.core.simulate import simulate_particles
from prime_plugin.core.working_box import WORK_MARGIN_PX, fourier_resize, insertion_radius_px, working_box_size
from scipy.spatial.transform import Rotation


def centred_spectrum(array, dims):
    axes = tuple(range(-dims, 0))
    return np.fft.fftshift(scipy.fft.fftn(np.fft.ifftshift(np.asarray(array, np.float64), axes=axes), axes=axes),
                           axes=axes)


@pytest.mark.parametrize("dims, n, m", [(2, 48, 32), (2, 32, 48), (3, 24, 16), (3, 16, 24)])
def test_resizing_keeps_the_transform_at_every_kept_frequency(dims, n, m):
    array = np.random.default_rng(dims + n).normal(size=(3,) * (dims == 2) + (n,) * dims).astype(np.float32)
    resized = fourier_resize(array, m, dims=dims)
    assert resized.shape[-dims:] == (m,) * dims
    big, small = centred_spectrum(array, dims), centred_spectrum(resized, dims)
    # Frequencies strictly inside the smaller box's Nyquist on every axis (the Nyquist terms are split).
    inner = min(n, m) // 2 - 1
    big_part = big[(Ellipsis,) + (slice(n // 2 - inner, n // 2 + inner + 1),) * dims]
    small_part = small[(Ellipsis,) + (slice(m // 2 - inner, m // 2 + inner + 1),) * dims]
    np.testing.assert_allclose(small_part, big_part, atol=1e-4 * np.abs(big_part).max())
    if m < n:  # cropping away nothing but the outer frequencies: padding back and cropping again is the identity
        np.testing.assert_allclose(fourier_resize(fourier_resize(resized, n, dims=dims), m, dims=dims), resized,
                                   atol=1e-5 * np.abs(resized).max())


def test_working_box_holds_the_limit_and_the_margin_and_never_shrinks():
    for limit in range(3, 120):
        size = working_box_size(256, limit)
        radius = insertion_radius_px(size, 256)
        assert size % 8 == 0 and (radius is None or radius > limit + WORK_MARGIN_PX)
        assert working_box_size(256, limit - 1) <= size  # grows with the limit
    assert working_box_size(256, 10, current=128) == 128
    assert working_box_size(256, 200) == 256 and insertion_radius_px(256, 256) is None


def shifted_ctf_images(box, count, seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, box, box)).astype(np.float32)
    shifts = rng.uniform(-3, 3, (count, 2))
    defocus_u = rng.uniform(8000, 25000, count)
    ctf = CtfParams(defocus_u, defocus_u * 0.95, rng.uniform(0, 180, count), np.full(count, 300.0),
                    np.full(count, 2.7), np.full(count, 0.1))
    return images, shifts, ctf


def insertion_settings(box, full_box, pixel_size_A, ops, radius_box=None):
    radius_box = box if radius_box is None else radius_box
    return InsertionSettings(box, pixel_size_A * full_box / box, 20.0, ops, image_box=full_box,
                             insertion_radius_px=insertion_radius_px(radius_box, full_box))


@pytest.mark.parametrize("symmetry", ["C1", "D2"])
def test_sums_made_at_a_small_box_are_the_centre_of_a_larger_boxs(symmetry):
    """Images cropped to 24 px and inserted there, grown to 40 px, equal the images cropped to 40 px and
    inserted with the 24 px box's radius: same pixels, same frequencies, same CTF and shift phases."""
    from prime_plugin.core.symmetry import symmetry_operators

    full, small, large, apix = 64, 24, 40, 2.0
    images, shifts, ctf = shifted_ctf_images(full, 6, seed=3)
    angles = np.stack([np.degrees(a) for a in Rotation.random(6, random_state=4).as_euler("ZYZ").T], axis=1)
    peaks, weights = angles[:, None, :], np.ones((6, 1))
    ops = symmetry_operators(symmetry)

    def inserted(box, radius_box):
        settings = insertion_settings(box, full, apix, ops, radius_box)
        return insert_particles(settings.working_images(images), shifts * settings.scale, ctf, peaks, weights,
                                settings)

    grown = inserted(small, small).grown(large)
    direct = inserted(large, small)
    assert np.abs(direct.rho).max() > 0
    np.testing.assert_allclose(grown.U, direct.U, atol=2e-5 * np.abs(direct.U).max())
    np.testing.assert_allclose(grown.rho, direct.rho, atol=2e-5 * direct.rho.max())


def projections(volume, count, seed):
    """Random orientations (count, 3) deg and the map's clean projections (count, N, N)."""
    rotations = Rotation.random(count, random_state=seed).as_matrix()
    from prime_plugin.core.geometry import matrix_to_euler

    angles = np.stack(matrix_to_euler(rotations), axis=1)
    return angles, FourierProjector(volume).project(euler_to_matrix(*angles.T)).astype(np.float32)


def test_a_cropped_reconstruction_is_the_full_one_low_passed(ribosome):
    """Projections of a map reconstructed at 32 px and resized to 64 agree with the full-size
    reconstruction up to the cropped box's insertion radius: FSC ~1 and the same amplitudes."""
    full, apix = 64, 5.0
    angles, clean = projections(ribosome, 300, seed=5)
    shifts = np.zeros((len(clean), 2))
    weights = np.ones((len(clean), 1))
    maps = {}
    for box in (32, full):
        settings = insertion_settings(box, full, apix, np.eye(3)[None])
        sums = insert_particles(settings.working_images(clean), shifts * settings.scale, None, angles[:, None, :],
                                weights, settings)
        maps[box] = fourier_resize(reconstruct_volume(sums), full)
    shells = int(insertion_radius_px(32, full)) - 1
    curve = fsc(maps[32], maps[full])[1:shells]
    assert curve.min() > 0.99
    shell = shell_index(full).ravel()
    amplitude = {box: np.bincount(shell, np.abs(np.fft.rfftn(m)).ravel())[1:shells] for box, m in maps.items()}
    np.testing.assert_allclose(amplitude[32] / amplitude[full], 1.0, atol=0.02)  # the same scale, shell by shell


def test_polar_transforms_of_cropped_images_match_the_full_size_ones(ribosome):
    _, clean = projections(ribosome, 20, seed=6)
    masked = normalise_and_mask(clean, 28.0)
    full = polar_transforms(masked, PolarGrid(64, 2, 12, 96))
    cropped = polar_transforms(fourier_resize(masked, 32, dims=2), PolarGrid(32, 2, 12, 96))
    error = np.abs(cropped - full).sum(axis=(0, 2)) / np.abs(full).sum(axis=(0, 2))
    assert error.max() < 0.03  # per ring, relative (the kernel's interpolation differs slightly)


@pytest.fixture(scope="module")
def noise_free_set(tmp_path_factory, ribosome):
    import mrcfile

    folder = tmp_path_factory.mktemp("cropped")
    simulate_particles(ribosome, 5.0, 240, folder, seed=7, max_shift_px=3.0, defocus_range_um=(1.0, 3.0))
    with mrcfile.new(folder / "truth.mrc") as mrc:
        mrc.set_data(ribosome)
        mrc.voxel_size = 5.0
    return folder


def test_the_cropped_search_finds_the_full_size_searchs_orientations(noise_free_set, monkeypatch):
    """One iteration (every particle searched exhaustively at alignment limit 8 px) at the working box
    (cropped to 48 px) and at the full 64 px box: the same orientations, and both near the truth."""
    import starfile

    folder = noise_free_set
    truth = starfile.read(folder / "particles.star")["particles"]
    true_rotations = euler_to_matrix(*truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T)
    found = {}
    for name in ("cropped", "full"):
        if name == "full":
            refine_module = importlib.import_module("prime_plugin.core.refine")  # the package exports refine()
            monkeypatch.setattr(refine_module, "working_box_size", lambda full_box, ring, current=0: full_box)
        result = refine(RefineParameters(str(folder / "particles.star"), str(folder / "truth.mrc"),
                                         str(folder / name), particle_diameter_A=300, max_iter=1, threads=2))
        assert result.state.history[0]["working_box"] == (48 if name == "cropped" else 64)
        found[name] = euler_to_matrix(*result.state.angles_deg.T)
    between = rotation_angles_deg(found["cropped"], found["full"])
    to_truth = {name: np.median(rotation_angles_deg(r, true_rotations)) for name, r in found.items()}
    assert np.mean(between < 3.0) > 0.95, np.percentile(between, [50, 90, 99])
    assert to_truth["cropped"] < to_truth["full"] + 0.3, to_truth


def test_re_searches_turn_local_only_where_the_resolution_needs_a_fine_sampling():
    from types import SimpleNamespace

    refine_module = importlib.import_module("prime_plugin.core.refine")
    box64 = SimpleNamespace(box=64, mask_radius_px=30.0, angular_step_deg=2.9)  # 300 A particle, 5 A/px
    assert all(refine_module.research_window_deg(box64, ring) is None for ring in range(3, 31))
    box256 = SimpleNamespace(box=256, mask_radius_px=100.0, angular_step_deg=1.6)  # 200 A particle, 1 A/px
    assert refine_module.research_window_deg(box256, 30) is None
    window = refine_module.research_window_deg(box256, 80)
    needed = 360.0 * 256 / (np.pi * 80 * 200)  # one resolution element at the particle's edge, in degrees
    assert window == pytest.approx(refine_module.LOCAL_RESEARCH_SAMPLINGS * needed)


def test_local_re_searches_find_what_exhaustive_re_searches_find(noise_free_set, monkeypatch):
    """Three iterations in which every re-search is local (the switch forced from the start) against the
    same with exhaustive re-searches: the orientations agree, and are as close to the truth."""
    import starfile

    folder = noise_free_set
    truth = starfile.read(folder / "particles.star")["particles"]
    true_rotations = euler_to_matrix(*truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T)
    refine_module = importlib.import_module("prime_plugin.core.refine")
    errors, found = {}, {}
    for name in ("exhaustive", "local"):
        if name == "local":
            monkeypatch.setattr(refine_module, "LOCAL_RESEARCH_BELOW_DEG", 1e3)
        result = refine(RefineParameters(str(folder / "particles.star"), str(folder / "truth.mrc"),
                                         str(folder / f"research_{name}"), particle_diameter_A=300, max_iter=3,
                                         update_fraction=0.5, threads=2))
        found[name] = euler_to_matrix(*result.state.angles_deg.T)
        errors[name] = np.median(rotation_angles_deg(found[name], true_rotations))
    assert np.mean(rotation_angles_deg(found["local"], found["exhaustive"]) < 3.0) > 0.95
    assert errors["local"] < errors["exhaustive"] + 0.2, errors
