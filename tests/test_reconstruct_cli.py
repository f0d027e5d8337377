"""``prime reconstruct``: RELION's relion_reconstruct as the oracle, symmetry, flat memory, bad input.

Data: the 70S ribosome map (shared data, 65^3 cropped to 64^3 with its centre at
index 32, 5 A/px) projected by relion_project at random orientations, origins up to
4 px and astigmatic CTFs, from a RELION 3.1 STAR written here (rlnRandomSubset
alternating 1, 2). Noise: white Gaussian, added by relion_project, at SNR 0.1 (mean
variance over the box of the clean CTF-modulated projections / noise variance).
"""

import subprocess
import sys

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.ndimage import affine_transform
from scipy.spatial.transform import Rotation

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import fsc
from prime_plugin.core.geometry import euler_to_matrix, matrix_to_euler
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.star_reconstruction import reconstruct_particles
from prime_plugin.core.symmetry import symmetry_operators

BOX = 64
APIX = 5.0
TWO_THIRDS_NYQUIST = (2 * (BOX // 2)) // 3  # shell 21 of 32


def prime(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "prime_plugin.cli", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


def first_crossing(curve, threshold):
    """Fractional shell where an FSC curve first drops below ``threshold`` (linear interpolation)."""
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        return float(len(curve) - 1)
    k = below[0] + 1
    return (k - 1) + (curve[k - 1] - threshold) / (curve[k - 1] - curve[k])


def write_star(path, angles_deg, origins_A=None, defocus=None, names=None, subsets=None, box=BOX, apix=APIX):
    """A RELION 3.1 particle STAR; defocus (n, 3) = (U A, V A, angle deg) or None."""
    n = len(angles_deg)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7], "rlnVoltage": [300.0],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({"rlnImageName": names if names is not None else [f"{i + 1}@x.mrcs" for i in range(n)],
                              "rlnAngleRot": angles_deg[:, 0], "rlnAngleTilt": angles_deg[:, 1],
                              "rlnAnglePsi": angles_deg[:, 2]})
    if origins_A is not None:
        particles["rlnOriginXAngst"], particles["rlnOriginYAngst"] = origins_A.T
    if defocus is not None:
        particles["rlnDefocusU"], particles["rlnDefocusV"], particles["rlnDefocusAngle"] = defocus.T
    particles["rlnOpticsGroup"] = 1
    particles["rlnRandomSubset"] = np.arange(n) % 2 + 1 if subsets is None else subsets
    starfile.write({"optics": optics, "particles": particles}, path, float_format="%.6f")


def random_angles(n, seed):
    return np.stack(matrix_to_euler(Rotation.random(n, random_state=seed).as_matrix()), axis=1)


def write_map(path, volume, apix=APIX):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = apix


@pytest.fixture(scope="module")
def ribosome(shared_data):
    """The ribosome map, 64^3 (v[:64, :64, :64] keeps the particle's centre at index 32), float32."""
    return mrcfile.read(shared_data / "ribosome70S_65px.mrc")[:BOX, :BOX, :BOX].astype(np.float32)


@pytest.fixture(scope="module")
def projected(tmp_path_factory, relion, ribosome):
    """Folder with map.mrc, clean.star/.mrcs and noisy.star/.mrcs (SNR 0.1) made by relion_project."""
    folder = tmp_path_factory.mktemp("relion_projections")
    n = 2000
    rng = np.random.default_rng(7)
    defocus_u = rng.uniform(10000, 30000, n)
    defocus = np.column_stack([defocus_u, defocus_u - rng.uniform(0, 2000, n), rng.uniform(0, 180, n)])
    write_map(folder / "map.mrc", ribosome)
    write_star(folder / "poses.star", random_angles(n, 7), rng.uniform(-4, 4, (n, 2)) * APIX, defocus)
    relion("relion_project", "--i", "map.mrc", "--o", "clean", "--ang", "poses.star", "--ctf", cwd=folder)
    sigma = np.sqrt(mrcfile.read(folder / "clean.mrcs").var(axis=(1, 2)).mean() / 0.1)
    relion("relion_project", "--i", "map.mrc", "--o", "noisy", "--ang", "poses.star", "--ctf",
           "--add_noise", "--white_noise", f"{sigma:.6g}", cwd=folder)
    return folder


@pytest.mark.relion
def test_relion_project_output_carries_poses_and_ctf(projected):
    particles = starfile.read(projected / "noisy.star")["particles"]
    for column in ("rlnAngleRot", "rlnOriginXAngst", "rlnDefocusU", "rlnRandomSubset"):
        assert column in particles.columns
    assert len(particles) == 2000


@pytest.mark.relion
def test_same_resolution_as_relion_reconstruct_at_snr_0_1(projected, relion, ribosome):
    code, out, err = prime("reconstruct", "--i", "noisy.star", "--o", "ours.mrc", "--ctf", "--j", "2", cwd=projected)
    assert code == 0, err
    assert "resolution (FSC = 0.143 between the half maps)" in out
    relion("relion_reconstruct", "--i", "noisy.star", "--o", "relion.mrc", "--ctf", cwd=projected)
    with mrcfile.open(projected / "ours.mrc") as mrc:
        ours = mrc.data.copy()
        assert mrc.voxel_size.x == pytest.approx(APIX)
    theirs = mrcfile.read(projected / "relion.mrc")
    ours_at, theirs_at = first_crossing(fsc(ours, ribosome), 0.5), first_crossing(fsc(theirs, ribosome), 0.5)
    assert abs(ours_at - theirs_at) <= 1.0, (ours_at, theirs_at)


@pytest.mark.relion
def test_noise_free_reconstruction_matches_the_map(projected, ribosome):
    result = reconstruct_particles(projected / "clean.star", ctf=True, threads=2)
    curve = fsc(result.volume, ribosome)
    assert curve[1:TWO_THIRDS_NYQUIST + 1].min() >= 0.9, np.round(curve, 3)
    assert result.pixel_size_A == APIX


def d2_symmetrised(volume):
    """Average of the volume over D2's rotations about the box centre N // 2, float32 (N, N, N) [z, y, x]."""
    centre = np.full(3, volume.shape[0] // 2, dtype=np.float64)
    reverse = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x)
    total = np.zeros_like(volume, dtype=np.float64)
    for R in symmetry_operators("D2"):
        matrix = reverse @ R @ reverse
        total += affine_transform(volume, matrix, offset=centre - matrix @ centre, order=1)
    return (total / 4).astype(np.float32)


def test_d2_reconstruction_equals_c1_with_every_mate_listed(tmp_path, ribosome):
    n = 300
    angles = random_angles(n, 3)
    images = FourierProjector(d2_symmetrised(ribosome)).project(euler_to_matrix(*angles.T))
    with mrcfile.new(tmp_path / "x.mrcs") as mrc:
        mrc.set_data(images)
    write_star(tmp_path / "asu.star", angles)
    mates = euler_to_matrix(*angles.T)[:, None] @ symmetry_operators("D2")[None]  # A R, (n, 4, 3, 3)
    write_star(tmp_path / "mates.star", np.stack(matrix_to_euler(mates.reshape(-1, 3, 3)), axis=1),
               names=np.repeat([f"{i + 1}@x.mrcs" for i in range(n)], 4), subsets=np.repeat(np.arange(n) % 2 + 1, 4))
    d2 = reconstruct_particles(tmp_path / "asu.star", symmetry="D2", threads=2)
    c1 = reconstruct_particles(tmp_path / "mates.star", symmetry="C1", threads=2)
    curve = fsc(d2.volume, c1.volume)
    assert curve[1:TWO_THIRDS_NYQUIST + 1].min() >= 0.99, np.round(curve, 4)
    assert d2.n_particles == n and c1.n_particles == 4 * n


def write_large_dataset(folder, n, projections, angles):
    """n particles cycling through a few projections, written in chunks with new_mmap (never all in memory)."""
    k = len(projections)
    with mrcfile.new_mmap(folder / "x.mrcs", shape=(n, BOX, BOX), mrc_mode=2, overwrite=True) as mrc:
        for start in range(0, n, 1000):
            stop = min(n, start + 1000)
            mrc.data[start:stop] = projections[np.arange(start, stop) % k]
    write_star(folder / "particles.star", angles[np.arange(n) % k])


def peak_rss_mb_of_prime_reconstruct(folder):
    """Peak resident set (MB) of ``prime reconstruct`` in a fresh process (RUSAGE_CHILDREN of a wrapper)."""
    wrapper = ("import resource, subprocess, sys; "
               "done = subprocess.run([sys.executable, '-m', 'prime_plugin.cli', 'reconstruct', '--i', "
               "'particles.star', '--o', 'map.mrc', '--j', '2']); "
               "assert done.returncode == 0; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", wrapper], cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_memory_stays_flat_in_the_number_of_particles(tmp_path, ribosome):
    angles = random_angles(40, 11)
    projections = FourierProjector(ribosome).project(euler_to_matrix(*angles.T))
    peaks = {}
    for n in (3000, 12000):
        folder = tmp_path / str(n)
        folder.mkdir()
        write_large_dataset(folder, n, projections, angles)
        peaks[n] = peak_rss_mb_of_prime_reconstruct(folder)
    stack_growth_mb = 9000 * BOX * BOX * 4 / 2**20
    assert stack_growth_mb > 140
    assert peaks[12000] - peaks[3000] < 40, peaks


@pytest.fixture
def small_dataset(tmp_path):
    """Four 16 x 16 particles with angles: x.mrcs and particles.star."""
    with mrcfile.new(tmp_path / "x.mrcs") as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32))
    write_star(tmp_path / "particles.star", random_angles(4, 0), box=16)
    return tmp_path


def test_small_dataset_reconstructs(small_dataset):
    code, out, err = prime("reconstruct", "--i", "particles.star", "--o", "map.mrc", "--sym", "d2", cwd=small_dataset)
    assert code == 0, err
    assert mrcfile.read(small_dataset / "map.mrc").shape == (16, 16, 16)


def assert_fails_cleanly(folder, args, *fragments):
    code, _, err = prime("reconstruct", *args, "--o", "out.mrc", cwd=folder)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (folder / "out.mrc").exists()
    assert not list(folder.glob(".out.mrc*"))


def test_missing_stack(small_dataset):
    (small_dataset / "x.mrcs").unlink()
    assert_fails_cleanly(small_dataset, ["--i", "particles.star"], "x.mrcs", "not found")


def test_star_without_angles(small_dataset):
    star = starfile.read(small_dataset / "particles.star")
    star["particles"] = star["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write(star, small_dataset / "noangles.star")
    assert_fails_cleanly(small_dataset, ["--i", "noangles.star"], "noangles.star", "rlnAngleRot")


def test_subset_3(small_dataset):
    assert_fails_cleanly(small_dataset, ["--i", "particles.star", "--subset", "3"], "--subset must be 1 or 2")


def test_unknown_symmetry(small_dataset):
    assert_fails_cleanly(small_dataset, ["--i", "particles.star", "--sym", "X7"], "unknown symmetry group 'X7'")


def test_ctf_without_defocus_columns(small_dataset):
    assert_fails_cleanly(small_dataset, ["--i", "particles.star", "--ctf"], "rlnDefocusU")


def test_subset_reconstructs_one_half_without_a_resolution(small_dataset):
    code, out, err = prime("reconstruct", "--i", "particles.star", "--o", "half1.mrc", "--subset", "1",
                           cwd=small_dataset)
    assert code == 0, err
    assert "half-set 1" in out and "resolution" not in out


def test_mixed_pixel_sizes_are_refused(small_dataset):
    star = starfile.read(small_dataset / "particles.star")
    second = star["optics"].assign(rlnOpticsGroup=2, rlnOpticsGroupName="opticsGroup2", rlnImagePixelSize=2 * APIX)
    star["optics"] = pd.concat([star["optics"], second], ignore_index=True)
    star["particles"]["rlnOpticsGroup"] = [1, 2, 1, 2]
    starfile.write(star, small_dataset / "mixed.star")
    with pytest.raises(PrimeInputError, match="different pixel sizes"):
        reconstruct_particles(small_dataset / "mixed.star")
