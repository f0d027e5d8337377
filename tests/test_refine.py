"""`prime refine`: accuracy on relion_project data (reduced size), RELION reading our outputs,
resume after kill -9, reproducibility, and bad input.

The scoring is the test's own: angular errors against the true angles, FSC from the
written maps, and the resolution reachable with the true angles (relion_reconstruct
of the true poses) as the bound the refinement is held to.
"""

import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import mrcfile
import numpy as np
import pytest
import starfile

from prime_plugin.core.fourier import fsc, resolution_at
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.refine import RefineParameters, refine
from relion_datasets import (astigmatic_defocus, perturbed_poses, random_poses, relion_projections,
                             write_particle_stack)

BOX, PIXEL, N_PARTICLES = 64, 5.0, 800


def angular_errors(true_angles, found_angles):
    a = euler_to_matrix(*true_angles.T)
    b = euler_to_matrix(*found_angles.T)
    cosine = (np.trace(np.einsum("nij,nkj->nik", a, b), axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def half_map_resolution(folder, half1, half2):
    curve = fsc(mrcfile.read(folder / half1), mrcfile.read(folder / half2))
    return resolution_at(curve, 0.143, BOX, PIXEL), curve


@pytest.fixture(scope="module")
def dataset(shared_data, tmp_path_factory, relion):
    """800 relion_project particles (SNR 0.1, CTF 1-3 um astigmatic, origins up to 4 px)."""
    folder = tmp_path_factory.mktemp("refine_data")
    volume = np.ascontiguousarray(mrcfile.read(shared_data / "ribosome70S_65px.mrc")[:BOX, :BOX, :BOX])
    angles, origins = random_poses(N_PARTICLES, seed=21, max_shift_px=4.0)
    data = relion_projections(relion, folder, volume, PIXEL, angles, origins, astigmatic_defocus(N_PARTICLES, 22))
    noisy = data.noisy(0.1, seed=23)
    write_particle_stack(folder, noisy, data, with_angles=False, name="input")
    write_particle_stack(folder, noisy, data, with_angles=True, name="truth")
    with mrcfile.new(folder / "truth.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = PIXEL
    # The bound: the half maps reconstructed by RELION at the true poses.
    for subset in (1, 2):
        relion("relion_reconstruct", "--i", "truth.star", "--o", f"true_half{subset}.mrc", "--ctf",
               "--subset", subset, cwd=folder)
    return folder, data, volume


@pytest.fixture(scope="module")
def refined(dataset):
    folder, data, volume = dataset
    seen = []
    started = time.perf_counter()
    here = os.getcwd()
    os.chdir(folder)  # the project folder, as a facility runs it: image names resolve from here
    try:
        result = refine(RefineParameters("input.star", "truth.mrc", "run", particle_diameter_A=300,
                                         update_fraction=0.25, max_iter=8), on_iteration=seen.append)
    finally:
        os.chdir(here)
    return folder / "run", result, seen, time.perf_counter() - started


@pytest.mark.relion
def test_refinement_recovers_orientations_and_resolution(dataset, refined):
    folder, data, volume = dataset
    out, result, seen, seconds = refined
    written = starfile.read(out / "run_data.star")["particles"]
    found = written[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    errors = angular_errors(data.angles_deg, found)
    ours, _ = half_map_resolution(out, "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc")
    bound, _ = half_map_resolution(folder, "true_half1.mrc", "true_half2.mrc")
    truth_05 = resolution_at(fsc(mrcfile.read(out / "run_class001.mrc"), volume), 0.5, BOX, PIXEL)
    print(f"\nmedian angular error {np.median(errors):.2f} deg; gold-standard {ours:.1f} A (true poses {bound:.1f} A);"
          f" map vs truth FSC 0.5 at {truth_05:.1f} A; {len(seen)} iterations in {seconds:.0f} s")
    assert np.median(errors) <= 3.0
    assert ours <= 1.15 * bound
    shifts = written[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIXEL
    assert np.median(np.linalg.norm(shifts - data.origins_px, axis=1)) < 1.0
    assert [f["iteration"] for f in seen] == list(range(1, len(seen) + 1))


@pytest.mark.relion
def test_local_refinement_from_perturbed_poses(dataset, refined):
    """Started from the true poses turned by 3 degrees and moved by 2 px, a local refinement
    (--sigma_ang 2: window 6 degrees) recovers the orientations as well as the global run does,
    scoring a few percent of the directions, and never strays beyond its window (plus a grid step)
    from the input. (Its time is printed, not asserted: the shared costs, references, insertions
    and origin refinement, keep it above half the global run's at this size.)"""
    from prime_plugin.core.geometry import rotation_angles_deg

    folder, data, _ = dataset
    _, global_result, _, global_seconds = refined
    blocks = starfile.read(folder / "truth.star")
    angles, origins = perturbed_poses(data.angles_deg, data.origins_px, 3.0, 2.0, seed=24)
    particles = blocks["particles"]
    particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"] = angles.T
    particles["rlnOriginXAngst"], particles["rlnOriginYAngst"] = (origins * PIXEL).T
    starfile.write(blocks, folder / "perturbed.star", float_format="%.8f")
    here = os.getcwd()
    os.chdir(folder)
    try:
        started = time.perf_counter()
        result = refine(RefineParameters("perturbed.star", "truth.mrc", "local", particle_diameter_A=300,
                                         update_fraction=0.25, max_iter=8, local_sigma_deg=2.0))
        seconds = time.perf_counter() - started
    finally:
        os.chdir(here)
    local_error = np.median(angular_errors(data.angles_deg, result.state.angles_deg))
    global_error = np.median(angular_errors(data.angles_deg, global_result.state.angles_deg))
    strayed = rotation_angles_deg(euler_to_matrix(*angles.T), euler_to_matrix(*result.state.angles_deg.T))
    print(f"\nlocal: median angular error {local_error:.2f} deg in {seconds:.0f} s; global: {global_error:.2f} deg "
          f"in {global_seconds:.0f} s; furthest from the input {strayed.max():.1f} deg")
    assert local_error <= global_error + 0.2
    assert local_error < 0.5 * 3.0
    assert strayed.max() <= 3 * 2.0 + result.setup.angular_step_deg
    assert result.state.fraction_visited.mean() < 0.05 < global_result.state.fraction_visited.mean()


@pytest.fixture(scope="module")
def high_snr_refined(shared_data, tmp_path_factory, relion):
    """A short refinement of 800 particles at SNR 2, where the signal reaches Nyquist.

    Beyond the resolution of the SNR 0.1 set the maps hold only noise, weighted by each
    program its own way (our n_peaks orientations, RELION's best one), so reading our
    conventions right is checked where there is signal to the edge.
    """
    folder = tmp_path_factory.mktemp("refine_high_snr")
    volume = np.ascontiguousarray(mrcfile.read(shared_data / "ribosome70S_65px.mrc")[:BOX, :BOX, :BOX])
    angles, origins = random_poses(800, seed=31, max_shift_px=4.0)
    rng = np.random.default_rng(32)
    defocus_u = rng.uniform(10000, 30000, 800)
    defocus = np.column_stack([defocus_u, defocus_u * 0.95, rng.uniform(0, 180, 800)])
    data = relion_projections(relion, folder, volume, PIXEL, angles, origins, defocus)
    write_particle_stack(folder, data.noisy(2.0, seed=33), data, name="input")
    with mrcfile.new(folder / "start.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = PIXEL
    here = os.getcwd()
    os.chdir(folder)
    try:
        refine(RefineParameters("input.star", "start.mrc", "run", particle_diameter_A=300, update_fraction=0.5,
                                max_iter=6, n_space=1000))
    finally:
        os.chdir(here)
    return folder


@pytest.mark.relion
def test_relion_reconstruct_reads_our_run_data(high_snr_refined, relion):
    folder = high_snr_refined
    # From the project folder, where the image names resolve (RELION's rule).
    relion("relion_reconstruct", "--i", "run/run_data.star", "--o", "relion_from_ours.mrc", "--ctf", cwd=folder)
    curve = fsc(mrcfile.read(folder / "relion_from_ours.mrc"), mrcfile.read(folder / "run" / "run_class001.mrc"))
    two_thirds = int(2 / 3 * BOX / 2)
    assert curve[1:two_thirds + 1].min() >= 0.9, np.round(curve, 3)


@pytest.mark.relion
def test_relion_postprocess_accepts_our_half_maps(refined, relion):
    from prime_plugin.core.fourier import soft_sphere_mask
    from prime_plugin.core.mrc import write_volume

    out = refined[0]
    mask = soft_sphere_mask(BOX, 28.0, 4.0)
    write_volume(out / "mask.mrc", mask, PIXEL)
    (out / "PostProcess").mkdir()
    printed = relion("relion_postprocess", "--i", "run_half1_class001_unfil.mrc", "--o", "PostProcess/postprocess",
                     "--angpix", PIXEL, "--mask", "mask.mrc", cwd=out)
    theirs = float(starfile.read(out / "PostProcess" / "postprocess.star")["general"]["rlnFinalResolution"])
    half1, half2 = (mrcfile.read(out / f"run_half{h}_class001_unfil.mrc") for h in (1, 2))
    ours = resolution_at(fsc(half1 * mask, half2 * mask), 0.143, BOX, PIXEL)
    shell_ours, shell_theirs = BOX * PIXEL / ours, BOX * PIXEL / theirs
    assert abs(shell_ours - shell_theirs) <= 1.0, printed[-2000:]


@pytest.mark.relion
def test_outputs_are_complete_and_consistent(refined):
    out, result, seen, _ = refined
    model = starfile.read(out / "run_model.star")
    table = model["model_class_1"]
    np.testing.assert_allclose(table["rlnGoldStandardFsc"].to_numpy(), result.fsc, atol=1e-9)
    np.testing.assert_allclose(table["rlnResolution"].to_numpy()[1:], np.arange(1, BOX // 2 + 1) / (BOX * PIXEL))
    posterior = starfile.read(out / "run_posterior.star")
    totals = posterior.groupby("rlnImageName")["rlnPrimePeakWeight"].sum()
    np.testing.assert_allclose(totals.to_numpy(), 1.0, atol=1e-6)
    top = posterior.groupby("rlnImageName")["rlnPrimePeakWeight"].max()
    data = starfile.read(out / "run_data.star")["particles"].set_index("rlnImageName")
    np.testing.assert_allclose(data.loc[top.index, "rlnMaxValueProbDistribution"], top.to_numpy(), rtol=1e-9)
    assert len(list(out.glob("run_it*_half1_class001_unfil.mrc"))) == len(seen)
    for plot in ("fsc.png", "angdist.png", "convergence.png"):
        pixels = matplotlib.image.imread(out / plot)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0.05
    assert mrcfile.open(out / "run_class001.mrc").voxel_size.x == pytest.approx(PIXEL)


@pytest.mark.relion
def test_sums_hold_one_insertion_of_every_particle(dataset, refined):
    """After iterations that each replace the update set's insertions (searched against sums without
    them), the sums equal a fresh insertion of every particle at its current orientations, weights and
    contrast, each at the working box it was last inserted at, grown to the sums' box: the subtractions
    removed exactly what had been added, also across working boxes."""
    from prime_plugin.core.refine_tasks import InsertionSettings, insert_particles
    from prime_plugin.core.polar import normalise_and_mask
    from prime_plugin.core.reconstruct import FourierSums
    from prime_plugin.core.working_box import insertion_radius_px

    folder, _, _ = dataset
    _, result, _, _ = refined
    state, setup = result.state, result.setup
    scale_weighting = RefineParameters("", "", "").scale_weighting  # the fixture runs with the defaults
    boxes = np.unique(state.inserted_box)
    assert boxes.min() > 0  # every particle inserted
    # the working box grew on the way: particles inserted at a smaller box were replaced at a larger one
    assert len({figures["working_box"] for figures in state.history}) >= 2
    here = os.getcwd()
    os.chdir(folder)
    try:
        for h in (1, 2):
            fresh = FourierSums.zeros(state.sums[h - 1].box)
            for box in boxes:
                rows = np.flatnonzero((state.half == h) & (state.inserted_box == box))
                insertion = InsertionSettings(int(box), setup.pixel_size_A * setup.box / box, setup.mask_radius_px,
                                              setup.symmetry_ops, image_box=setup.box,
                                              insertion_radius_px=insertion_radius_px(box, setup.box))
                images = normalise_and_mask(setup.images.locate(rows).read(), setup.mask_radius_px, 4.0, mask=False)
                fresh += insert_particles(insertion.working_images(images), state.shift_px[rows] * box / setup.box,
                                          setup.ctf.take(rows), state.peak_angles_deg[rows], state.peak_weights[rows],
                                          insertion, state.scale[rows] if scale_weighting else None
                                          ).grown(fresh.box)
            kept = state.sums[h - 1]
            for name in ("U", "rho"):
                ours, theirs = getattr(kept, name), getattr(fresh, name)
                assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), name
    finally:
        os.chdir(here)


def prime_refine(*args, cwd):
    return subprocess.run([sys.executable, "-m", "prime_plugin.cli", "refine", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=900)


SMALL = ["--i", "input.star", "--ref", "truth.mrc", "--particle_diameter", "300", "--update_frac", "0.5",
         "--max_iter", "4", "--nspace", "300", "--seed", "5", "--j", "2"]


@pytest.mark.relion
def test_continue_after_kill_gives_the_same_result(dataset):
    folder = dataset[0]
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    done = prime_refine(*SMALL, "--o", "whole", cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    first_angles = starfile.read(folder / "whole" / "run_data.star")["particles"][angles].to_numpy()
    first_map = mrcfile.read(folder / "whole" / "run_class001.mrc")
    again = prime_refine(*SMALL, "--o", "whole", "--force", cwd=folder)
    assert again.returncode == 0, again.stderr[-2000:]
    process = subprocess.Popen([sys.executable, "-m", "prime_plugin.cli", "refine", *SMALL, "--o", "killed"],
                               cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = folder / "killed" / ".checkpoint" / "checkpoint_state.npz"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the second iteration
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = prime_refine(*SMALL, "--o", "killed", "--continue", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Bit for bit: the same run twice (the second with --force over the first), and the run resumed.
    for other in ("whole", "killed"):
        np.testing.assert_array_equal(starfile.read(folder / other / "run_data.star")["particles"][angles].to_numpy(),
                                      first_angles)
        np.testing.assert_array_equal(mrcfile.read(folder / other / "run_class001.mrc"), first_map)


def assert_refused(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.relion
def test_bad_input_is_refused_before_anything_is_written(dataset, tmp_path):
    folder = dataset[0]
    base = ["--i", folder / "input.star", "--ref", folder / "truth.mrc"]
    with mrcfile.new(tmp_path / "other.mrc") as mrc:
        mrc.set_data(np.zeros((40, 40, 40), np.float32))
    (tmp_path / "empty.star").write_text("data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n"
                                         "1 5.0\n\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n")
    few = starfile.read(folder / "input.star")
    few["particles"] = few["particles"].iloc[:12]
    few["particles"]["rlnImageName"] = [f"{i + 1:06d}@{folder / 'input.mrcs'}" for i in range(12)]
    starfile.write(few, tmp_path / "few.star")
    with mrcfile.new(tmp_path / "bad_mask.mrc") as mrc:
        mrc.set_data(np.full((BOX, BOX, BOX), 2.0, np.float32))
    cases = [
        (["--i", folder / "input.star", "--ref", tmp_path / "other.mrc"], ("other.mrc", "cannot tell how to resample")),
        ([*base, "--solvent_mask", tmp_path / "bad_mask.mrc"], ("bad_mask.mrc", "values in [0, 1]")),
        ([*base, "--solvent_mask", tmp_path / "other.mrc"], ("other.mrc", "box 40")),
        (["--i", tmp_path / "empty.star", "--ref", folder / "truth.mrc"], ("empty.star", "empty")),
        ([*base, "--particle_diameter", "400"], ("--particle_diameter 400",)),
        (["--i", tmp_path / "few.star", "--ref", folder / "truth.mrc"], ("few.star", "at least 10")),
        ([*base, "--sym", "Q7"], ("unknown symmetry group",)),
        ([*base, "--max_iter", "0"], ("--max_iter", "at least 1")),
        ([*base, "--sigma", "0"], ("--sigma must be positive",)),
    ]
    for k, (args, fragments) in enumerate(cases):
        assert_refused(prime_refine(*args, "--o", tmp_path / f"out{k}", cwd=tmp_path), *fragments)
        assert not (tmp_path / f"out{k}").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "run.log").write_text("a previous run")
    assert_refused(prime_refine(*base, "--o", tmp_path / "busy", cwd=tmp_path), "already holds a refinement")
    assert (tmp_path / "busy" / "run.log").read_text() == "a previous run"


@pytest.mark.relion
def test_reference_of_another_sampling_is_resampled_and_said(dataset, tmp_path):
    """A reference at 2.5 A/px in a 128 box gives the same starting map as the 5 A/px, 64 box one."""
    from prime_plugin.core.refine_setup import prepare
    from prime_plugin.core.resample import resample_volume

    folder, _, volume = dataset
    fine, achieved = resample_volume(volume, PIXEL, 2.5, 128)
    assert achieved == pytest.approx(2.5)
    with mrcfile.new(tmp_path / "fine.mrc") as mrc:
        mrc.set_data(fine)
        mrc.voxel_size = 2.5
    same = prepare(RefineParameters(str(folder / "input.star"), str(folder / "truth.mrc"), str(tmp_path / "a")))
    other = prepare(RefineParameters(str(folder / "input.star"), str(tmp_path / "fine.mrc"), str(tmp_path / "b")))
    assert any("resampled from 2.5 A/px and box 128 to 5 A/px and box 64" in note for note in other.notes)
    assert not any("resampled" in note for note in same.notes)
    assert np.abs(other.reference - same.reference).max() <= 1e-3 * np.abs(same.reference).max()
