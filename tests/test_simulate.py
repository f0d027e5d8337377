"""prime simulate: images, STAR file and conventions of simulated data sets.

Oracles: our and starfile's/emtable's readers; the projector at the written
angles; np.roll for integer shifts (RELION's origin sign); the noise statistics
rebuilt from the written STAR; canonical projection directions for symmetry; and,
from outside, relion_reconstruct on a simulated data set, which must give back the
simulating map.
"""

import subprocess
import sys

import emtable
import mrcfile
import numpy as np
import pytest
import starfile

from prime_plugin.cli import main as prime_main
from prime_plugin.core.ctf import CtfParams, ctf_image
from prime_plugin.core.directions import canonical_mates
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import fsc
from prime_plugin.core.geometry import euler_to_matrix, projection_direction
from prime_plugin.core.images import ParticleImages
from prime_plugin.core.mrc import read_volume, write_volume
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.resample import resample_volume
from prime_plugin.core.simulate import simulate_particles
from prime_plugin.core.star import read_particles
from prime_plugin.core.symmetry import symmetry_operators

PIXEL_A = 4.0
OPTICS_COLUMNS = ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize", "rlnImageSize",
                  "rlnImageDimensionality", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
POSE_COLUMNS = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
CTF_COLUMNS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor"]


def blob_map(box=32):
    """An asymmetric map: three Gaussian blobs of different sizes and weights, float32 (box, box, box)."""
    axis = np.arange(box) - box // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    volume = np.zeros((box,) * 3)
    for (cz, cy, cx), sigma, weight in (((0, 0, 0), 3.0, 1.0), ((4, -5, 2), 2.0, 0.7), ((-3, 2, 6), 1.5, 0.5)):
        volume += weight * np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))
    return volume.astype(np.float32)


def read_stack(path):
    """(images float32 (n, y, x), voxel size in A, header copy) of an MRC stack, read strictly."""
    with mrcfile.open(path, permissive=False) as mrc:
        return np.array(mrc.data), float(mrc.voxel_size.x), mrc.header.copy()


def written_poses(table):
    """(rotations (n, 3, 3), origins in pixels (n, 2)) read back from a ParticleTable."""
    angles = table.angles_deg
    return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]), table.shifts_px


def test_star_file_is_read_by_our_reader_starfile_and_emtable(tmp_path):
    out = simulate_particles(blob_map(), PIXEL_A, 10, tmp_path / "sim", defocus_range_um=(1.0, 2.0),
                             max_shift_px=2.0)
    table = read_particles(out.star_path)
    assert len(table) == 10 and not table.converted_from_30
    assert list(table.optics.columns) == OPTICS_COLUMNS
    assert list(table.particles.columns) == POSE_COLUMNS + CTF_COLUMNS + ["rlnOpticsGroup", "rlnRandomSubset"]
    assert table.optics["rlnImageSize"].iloc[0] == 32 and np.all(table.pixel_size_A == PIXEL_A)
    assert table.particles["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    assert list(table.particles["rlnRandomSubset"]) == [1, 2] * 5
    defocus = table.particles[["rlnDefocusU", "rlnDefocusV"]].to_numpy()
    assert np.all((defocus[:, 0] >= 1e4) & (defocus[:, 0] <= 2e4))
    assert np.all((defocus[:, 1] <= defocus[:, 0]) & (defocus[:, 1] >= 0.9 * defocus[:, 0]))
    assert np.all(np.hypot(*table.shifts_px.T) <= 2.0 + 1e-9)

    blocks = starfile.read(out.star_path, always_dict=True)
    assert len(blocks["particles"]) == 10 and blocks["optics"]["rlnImagePixelSize"].iloc[0] == PIXEL_A
    rows = list(emtable.Table.iterRows(str(out.star_path), tableName="particles"))
    np.testing.assert_array_equal([row.rlnAngleTilt for row in rows], table.particles["rlnAngleTilt"])

    with ParticleImages(table) as images:  # rlnImageName resolves beside the STAR file
        assert images.box == 32 and len(images) == 10
    stack, voxel_A, header = read_stack(out.stack_path)
    assert stack.shape == (10, 32, 32) and stack.dtype == np.float32
    assert voxel_A == pytest.approx(PIXEL_A) and header.ispg == 0  # an image stack, as RELION writes them
    assert header.dmax == pytest.approx(stack.max()) and header.rms == pytest.approx(stack.std(), rel=1e-4)


@pytest.mark.parametrize("box", [32, 33])
def test_noise_free_images_are_projections_at_the_written_angles(tmp_path, box):
    volume = blob_map(box)
    out = simulate_particles(volume, PIXEL_A, 40, tmp_path, chunk_size=16)
    rotations, origins_px = written_poses(read_particles(out.star_path))
    assert np.all(origins_px == 0)
    stack = read_stack(out.stack_path)[0]
    expected = FourierProjector(volume).project(rotations)
    np.testing.assert_allclose(stack, expected, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(stack[0], stack[1], atol=0.1 * np.abs(expected).max())  # the poses differ


def test_shifted_images_follow_relion_origins(tmp_path):
    volume = blob_map()
    out = simulate_particles(volume, PIXEL_A, 30, tmp_path, max_shift_px=5.0)
    rotations, origins_px = written_poses(read_particles(out.star_path))
    radii = np.hypot(*origins_px.T)
    assert radii.max() <= 5.0 + 1e-9 and radii.max() > 3.0
    stack = read_stack(out.stack_path)[0]
    projector = FourierProjector(volume)
    expected = projector.project(rotations, shifts_px=origins_px)
    np.testing.assert_allclose(stack, expected, atol=1e-5 * np.abs(expected).max())


def test_integer_origin_moves_the_particle_by_minus_origin(tmp_path, monkeypatch):
    """Independent of the projector's shift code: origin (+3, -2) px puts the centre at (c - 3, c + 2)."""
    import prime_plugin.core.random_poses as random_poses

    monkeypatch.setattr(random_poses, "random_origins_px", lambda n, rng, r: np.tile([[3.0, -2.0]], (n, 1)))
    volume = blob_map()
    out = simulate_particles(volume, PIXEL_A, 3, tmp_path, max_shift_px=4.0)
    table = read_particles(out.star_path)
    np.testing.assert_array_equal(table.shifts_A, np.tile([[3.0 * PIXEL_A, -2.0 * PIXEL_A]], (3, 1)))
    rotations, _ = written_poses(table)
    unshifted = FourierProjector(volume).project(rotations)
    stack = read_stack(out.stack_path)[0]
    np.testing.assert_allclose(stack, np.roll(unshifted, (2, -3), axis=(1, 2)), atol=1e-5 * np.abs(unshifted).max())


def test_snr_is_signal_variance_over_unit_noise_variance(tmp_path):
    volume = blob_map()
    out = simulate_particles(volume, PIXEL_A, 400, tmp_path, snr=0.5, defocus_range_um=(1.0, 3.0),
                             max_shift_px=3.0, seed=7)
    table = read_particles(out.star_path)
    rotations, origins_px = written_poses(table)
    ctf = ctf_image(CtfParams.from_star(table.particles_with_optics()), 32, PIXEL_A, rfft=True)
    clean = FourierProjector(volume).project(rotations, shifts_px=origins_px, ctf=ctf).astype(np.float64)
    stack = read_stack(out.stack_path)[0]
    # The scale is recovered from the data (least squares), then compared with the simulator's.
    scale = np.sum(stack * clean) / np.sum(clean * clean)
    assert scale == pytest.approx(out.signal_scale, rel=0.01)
    noise = stack - out.signal_scale * clean
    assert noise.var(axis=(1, 2)).mean() == pytest.approx(1.0, abs=0.01)
    assert abs(noise.mean()) < 0.01
    assert (out.signal_scale ** 2 * clean.var(axis=(1, 2))).mean() == pytest.approx(0.5, rel=0.05)
    assert (clean[:256].var(axis=(1, 2))).mean() == pytest.approx(out.mean_clean_variance, rel=1e-4)  # the pilot


def test_same_seed_same_data_set(tmp_path):
    kwargs = dict(snr=1.0, defocus_range_um=(1.0, 3.0), max_shift_px=2.0, seed=3)
    first = simulate_particles(blob_map(), PIXEL_A, 20, tmp_path / "a", **kwargs)
    second = simulate_particles(blob_map(), PIXEL_A, 20, tmp_path / "b", chunk_size=7, **kwargs)
    assert first.star_path.read_text() == second.star_path.read_text()
    np.testing.assert_allclose(read_stack(first.stack_path)[0], read_stack(second.stack_path)[0], atol=1e-5)


@pytest.mark.parametrize("group", ["D2", "C1"])
def test_angles_lie_in_the_asymmetric_unit(tmp_path, group):
    out = simulate_particles(blob_map(), PIXEL_A, 2000, tmp_path, symmetry=group)
    angles = read_particles(out.star_path).angles_deg
    directions = projection_direction(angles[:, 0], angles[:, 1])
    operators = symmetry_operators(group)
    assert np.all(canonical_mates(directions, operators) == 0)
    # Spread evenly over the unit: over the group's mates the directions cover the sphere uniformly.
    mates = np.einsum("kij,nj->kni", operators, directions).reshape(-1, 3)
    assert np.linalg.norm(mates.mean(axis=0)) < 4.0 / np.sqrt(len(mates))
    assert np.abs(np.cos(np.radians(angles[:, 2])).mean()) < 4.0 / np.sqrt(len(angles))  # psi uniform


def test_library_refuses_bad_arguments(tmp_path):
    volume = blob_map()
    bad = [dict(n=0), dict(snr=0.0), dict(snr=-1.0), dict(box=4), dict(max_shift_px=9.0), dict(seed=-1),
           dict(defocus_range_um=(3.0, 1.0)), dict(symmetry="X3"), dict(amplitude_contrast=1.5)]
    for kwargs in bad:
        with pytest.raises(PrimeInputError):
            simulate_particles(volume, PIXEL_A, **{"n": 5, "out_dir": tmp_path / "out", **kwargs})
    with pytest.raises(PrimeInputError, match="smaller than needed"):
        simulate_particles(volume, PIXEL_A, 5, tmp_path / "out", box=12)  # cuts the blobs
    assert not (tmp_path / "out").exists()
    simulate_particles(volume, PIXEL_A, 5, tmp_path / "out")
    with pytest.raises(PrimeInputError, match="already exists"):
        simulate_particles(volume, PIXEL_A, 5, tmp_path / "out")
    simulate_particles(volume, PIXEL_A, 6, tmp_path / "out", overwrite=True)
    assert len(read_particles(tmp_path / "out" / "particles.star")) == 6
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["particles.mrcs", "particles.star"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import prime_plugin.core.star as star

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(star, "write_star_blocks", broken)
    with pytest.raises(OSError, match="disk full"):
        simulate_particles(blob_map(), PIXEL_A, 5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def prime(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "prime_plugin.cli", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def maps(tmp_path):
    """good.mrc (32^3, 4 A/px), flat.mrc (32 x 32 x 30), nopixel.mrc (header pixel size 0)."""
    write_volume(tmp_path / "good.mrc", blob_map(), PIXEL_A)
    write_volume(tmp_path / "flat.mrc", blob_map()[:, :, :30], PIXEL_A)
    write_volume(tmp_path / "nopixel.mrc", blob_map(), 0.0)
    return tmp_path


@pytest.mark.parametrize("args, fragment", [
    (["--map", "missing.mrc", "--n", 5], "missing.mrc: file not found"),
    (["--map", "flat.mrc", "--n", 5], "cubic"),
    (["--map", "good.mrc", "--n", 0], "number of particles"),
    (["--map", "nopixel.mrc", "--n", 5], "--angpix"),
    (["--map", "good.mrc", "--n", 5, "--sym", "Q7"], "unknown symmetry group 'Q7'"),
    (["--map", "good.mrc", "--n", 5, "--snr", "-1"], "SNR"),
    (["--map", "good.mrc", "--n", 5, "--defocus", 2, 1], "defocus"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(maps, args, fragment):
    code, _, err = prime("simulate", *args, "--o", "out", cwd=maps)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err
    assert not (maps / "out").exists()


def test_cli_writes_a_data_set(maps, capsys):
    code = prime_main(["simulate", "--map", str(maps / "nopixel.mrc"), "--angpix", "3", "--n", "7", "--box", "40",
                       "--o", str(maps / "out"), "--defocus", "1", "2", "--snr", "2", "--shift_px", "2", "--j", "1"])
    assert code == 0
    assert "7 particles, box 40 px, 3 A/px, SNR 2" in capsys.readouterr().out
    table = read_particles(maps / "out" / "particles.star")
    assert len(table) == 7 and table.optics["rlnImageSize"].iloc[0] == 40 and np.all(table.pixel_size_A == 3.0)
    code = prime_main(["simulate", "--map", str(maps / "good.mrc"), "--rescale_angpix", "8", "--n", "3",
                       "--o", str(maps / "coarse")])
    assert code == 0
    table = read_particles(maps / "coarse" / "particles.star")
    assert table.optics["rlnImageSize"].iloc[0] == 16 and np.all(table.pixel_size_A == 8.0)


def peak_rss_kb(n, folder):
    """Peak resident memory (kB) of a fresh process running ``prime simulate`` with n particles, box 64."""
    code = ("import resource, sys\n"
            "from prime_plugin.cli import main\n"
            f"assert main(['simulate', '--map', 'map.mrc', '--n', '{n}', '--o', 'out{n}', '--snr', '1',"
            " '--defocus', '1', '3', '--shift_px', '3']) == 0\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_the_number_of_particles(tmp_path):
    axis = np.arange(64) - 32
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    write_volume(tmp_path / "map.mrc", np.exp(-r2 / 200.0).astype(np.float32), 2.0)
    small = peak_rss_kb(2000, tmp_path)
    large = peak_rss_kb(8000, tmp_path)
    stack_growth_kb = 6000 * 64 * 64 * 4 / 1024  # 96 MB more images: memory must not follow
    assert large - small < 0.25 * stack_growth_kb, (small, large)


@pytest.mark.relion
def test_relion_reconstruct_gives_back_the_simulating_map(relion, shared_data, tmp_path):
    """Angles, origin signs and CTF as RELION reads them: its reconstruction matches the map."""
    code = prime_main(["simulate", "--map", str(shared_data / "ribosome70S_65px.mrc"), "--angpix", "5",
                       "--box", "64", "--n", "2000", "--shift_px", "4", "--defocus", "1", "3", "--snr", "10",
                       "--o", str(tmp_path / "sim")])
    assert code == 0
    relion("relion_reconstruct", "--i", "particles.star", "--o", "rec.mrc", "--ctf", "--angpix", 5,
           cwd=tmp_path / "sim")
    reconstruction, pixel_A = read_volume(tmp_path / "sim" / "rec.mrc")
    assert pixel_A == pytest.approx(5.0)
    volume, _ = read_volume(shared_data / "ribosome70S_65px.mrc")
    volume, _ = resample_volume(volume, 5.0, new_box=64)
    curve = fsc(reconstruction, volume)
    assert curve[1:22].min() >= 0.9, np.round(curve, 3)
