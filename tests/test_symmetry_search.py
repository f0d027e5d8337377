"""Symmetry axes in C1 maps (core/symmetry_search.py, prime align_symmetry).

Oracles: maps made analytically (Gaussian blobs placed at a group's images of random points,
then at R of those points, so the rotated map needs no interpolation and its axes are R's
images of RELION's, known exactly); the analytic geometry of the groups' axes; the shipped
beta-galactosidase map, D2 in RELION's orientation; relion_align_symmetry 3.1 on the same
rotated maps. Axes are compared as lines, each n-fold axis with the nearest n-fold axis of the
other answer (axis_disagreement_deg, itself tested on rotations of known effect): an alignment
is defined only up to the group (and its normaliser), so matrices are not compared.
"""

import re
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.mrc import read_volume, write_volume
from prime_plugin.core.symmetry import rotation_about_axis, symmetry_operators
from prime_plugin.core.symmetry_search import axis_disagreement_deg, find_symmetry_axes, symmetry_axes
from prime_plugin.core.volume_rotation import rotate_volume, symmetrise_volume

BETAGAL = "prime_plugin/data/betagal_d2_64.mrc"
TOLERANCE_DEG = 2.0  # issue 17's acceptance: within 2 degrees of the truth and of relion_align_symmetry


def blob_map(symmetry, box, rotation, seed, n_blobs=6, sigma_px=1.6, offset_px=(0.0, 0.0, 0.0), spread=0.13):
    """float32 (box,)*3 map of Gaussian blobs at ``rotation @ g @ c + offset_px`` ((x, y, z) voxels from the box
    centre) for random c (normal, ``spread * box`` voxels each way) and every g of the group.

    With ``rotation`` the identity the map is symmetric in RELION's orientation; otherwise its
    axes are ``rotation @ a`` for the group's standard axes a (the truth: R = rotation^T).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, 3)) * box * spread
    weights = np.tile(rng.uniform(0.5, 1.0, n_blobs), len(symmetry_operators(symmetry)))
    points = np.einsum("ij,gjk,nk->gni", rotation, symmetry_operators(symmetry), centres).reshape(-1, 3)
    points += np.asarray(offset_px)
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    volume = np.zeros((box,) * 3)
    for (px, py, pz), w in zip(points, weights):
        volume += w * np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * sigma_px ** 2))
    return volume.astype(np.float32)


def random_rotation(seed):
    return Rotation.random(random_state=seed).as_matrix()


def correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------ the groups' axes and the comparison

@pytest.mark.parametrize("name, counts", [("C4", {4: 1}), ("D2", {2: 3}), ("D7", {7: 1, 2: 7}), ("T", {3: 4, 2: 3}),
                                          ("O", {4: 3, 3: 4, 2: 6}), ("I", {5: 6, 3: 10, 2: 15}), ("C1", {})])
def test_symmetry_axes_counts(name, counts):
    axes = symmetry_axes(name)
    assert {n: len(lines) for n, lines in axes.items()} == counts
    for n, lines in axes.items():  # each line is an n-fold axis: the rotation by 360/n about it is in the group
        ops = symmetry_operators(name)
        for line in lines:
            turn = rotation_about_axis(line, 360.0 / n)
            assert np.abs(ops - turn).max(axis=(1, 2)).min() < 1e-9


def test_relion_axes_where_relion_puts_them():
    def holds(lines, direction):
        return np.abs(lines @ (np.asarray(direction) / np.linalg.norm(direction))).max() > 1 - 1e-9

    assert holds(symmetry_axes("D7")[7], [0, 0, 1]) and holds(symmetry_axes("D7")[2], [1, 0, 0])
    assert holds(symmetry_axes("T")[3], [0, 0, 1]) and holds(symmetry_axes("T")[2], [0, np.sqrt(2 / 3), np.sqrt(1 / 3)])
    assert holds(symmetry_axes("C4")[4], [0, 0, 1])


@pytest.mark.parametrize("n", [2, 3, 7])
def test_axis_disagreement_is_the_turn_of_the_two_folds(n):
    """D<n> turned by d about z: the n-fold stays, every 2-fold moves by d (while d < 90 / n)."""
    for d in (0.5, 3.0, 0.4 * 90.0 / n):
        assert axis_disagreement_deg(f"D{n}", np.eye(3), rotation_about_axis([0, 0, 1], d)) == pytest.approx(d, abs=1e-6)
    # A turn by 180 / n brings the 2-folds onto each other: the same axes.
    assert axis_disagreement_deg(f"D{n}", np.eye(3), rotation_about_axis([0, 0, 1], 180.0 / n)) < 1e-6


def test_axis_disagreement_ignores_group_elements_and_sees_tilts():
    R = random_rotation(1)
    for name in ("D2", "T", "O", "I", "C5"):
        for g in symmetry_operators(name):
            assert axis_disagreement_deg(name, R, g @ R) < 1e-5
    tilt = rotation_about_axis([1, 0, 0], 2.5)
    assert axis_disagreement_deg("C4", R, tilt @ R) == pytest.approx(2.5, abs=1e-6)  # the 4-fold tilted by 2.5


# ------------------------------------------------------------ whole-map rotation and symmetrisation

@pytest.mark.parametrize("box", [32, 33])
def test_rotate_volume_moves_a_blob_to_r_p(box):
    """out(r) = v(R^T r): a blob at p goes to R p (against the analytic blob there)."""
    p = np.array([5.0, -3.0, 2.0])
    R = random_rotation(3)
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")

    def blob(q):
        return np.exp(-((x - q[0]) ** 2 + (y - q[1]) ** 2 + (z - q[2]) ** 2) / (2 * 2.0 ** 2))

    assert correlation(rotate_volume(blob(p), R), blob(R @ p)) > 0.999
    assert correlation(rotate_volume(blob(p), R.T), blob(R @ p)) < 0.5  # not the transpose


def test_symmetrise_volume_keeps_a_symmetric_map_and_symmetrises_an_asymmetric_one():
    symmetric = blob_map("D3", 32, np.eye(3), seed=2)
    assert correlation(symmetrise_volume(symmetric, "D3"), symmetric) > 0.999
    asymmetric = blob_map("C1", 32, np.eye(3), seed=2)
    averaged = symmetrise_volume(asymmetric, "D3")
    assert correlation(averaged, asymmetric) < 0.9  # the symmetric map's own stays above 0.999
    assert correlation(symmetrise_volume(averaged, "D3"), averaged) > 0.999


# ------------------------------------------------------------ axis recovery

def assert_recovered(volume, symmetry, truth_R, pixel_size_A=4.0, clean=None, **options):
    """Align ``volume`` (``clean``: the same without noise, aligned by the rotation found, for a map
    searched with ``recentre=False``) and check its axes against the truth, (alignment, error)."""
    found = find_symmetry_axes(volume, pixel_size_A, symmetry, **options)
    error = axis_disagreement_deg(symmetry, found.rotation, truth_R)
    assert error < TOLERANCE_DEG, (symmetry, error, found.score)
    # The aligned map obeys RELION's operators: it agrees with its own average over the group.
    aligned = found.volume if clean is None else rotate_volume(clean, found.rotation)
    assert correlation(aligned, symmetrise_volume(aligned, symmetry)) > 0.95
    np.testing.assert_allclose(euler_to_matrix(*found.euler_deg), found.rotation, atol=1e-9)
    return found, error


@pytest.mark.parametrize("symmetry", ["D2", "C4", "D7", "T"])
def test_axes_of_a_rotated_map(symmetry):
    rotation = random_rotation(20)
    found, _ = assert_recovered(blob_map(symmetry, 32, rotation, seed=5), symmetry, rotation.T)
    assert found.score > 0.99 and found.search_score > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("symmetry", ["D2", "C4", "D7", "T", "O", "I", "D6", "C7"])
@pytest.mark.parametrize("seed", range(4))
def test_axes_of_rotated_maps_many(symmetry, seed):
    rotation = random_rotation(100 + seed)
    assert_recovered(blob_map(symmetry, 40, rotation, seed=seed), symmetry, rotation.T)


@pytest.mark.slow
@pytest.mark.parametrize("symmetry", ["C4", "D7", "T"])
@pytest.mark.parametrize("seed", range(3))
def test_axes_of_noisy_maps(symmetry, seed):
    """White noise as strong as the signal (per voxel), the search low-passed to 12 A (the axes pass
    through the box centre; the centre of mass of noise is not needed)."""
    rotation = random_rotation(200 + seed)
    clean = blob_map(symmetry, 40, rotation, seed=seed)
    noise = np.random.default_rng(seed).normal(size=clean.shape).astype(np.float32) * clean.std()
    assert_recovered(clean + noise, symmetry, rotation.T, clean=clean, resolution_A=12.0, recentre=False)


@pytest.fixture(scope="module")
def betagal():
    return read_volume(BETAGAL)


def test_axes_of_rotated_betagalactosidase(betagal):
    volume, pixel_size_A = betagal
    rotation = random_rotation(7)
    found, _ = assert_recovered(rotate_volume(volume, rotation), "D2", rotation.T, pixel_size_A)
    assert found.working_box <= 40 and np.abs(found.shift_px).max() < 0.5  # D2: the centre of mass is on the axes


def test_a_map_off_centre_is_recentred_first():
    """A C4 map whose axis misses the box centre: moved onto its centre of mass (on the axis), then aligned."""
    rotation = random_rotation(9)
    offset = np.array([4.0, -3.0, 2.0])
    volume = blob_map("C4", 48, rotation, seed=3, offset_px=offset, spread=0.08)
    faces = np.concatenate([volume[[0, -1]].ravel(), volume[:, [0, -1]].ravel(), volume[..., [0, -1]].ravel()])
    assert faces.max() < 1e-3 * volume.max()  # the whole particle is in the box: its centre of mass is known
    found, _ = assert_recovered(volume, "C4", rotation.T)
    # The move brings the offset back, give or take a move along the axis (where the centre of mass is).
    axis = rotation @ [0.0, 0.0, 1.0]
    residual = offset + found.shift_px
    assert np.linalg.norm(residual - (residual @ axis) * axis) < 0.2
    # Without the move no rotation about the centre can make it symmetric.
    assert find_symmetry_axes(volume, 4.0, "C4", recentre=False).score < 0.95


def test_an_asymmetric_map_scores_low():
    """The score tells a map without the symmetry from one with it (the search cannot make it up)."""
    asymmetric = blob_map("C1", 32, random_rotation(4), seed=8, n_blobs=12)
    assert find_symmetry_axes(asymmetric, 4.0, "D2").score < 0.8
    symmetric = blob_map("D2", 32, random_rotation(4), seed=8, n_blobs=3)
    assert find_symmetry_axes(symmetric, 4.0, "D2").score > 0.99


def test_c1_leaves_the_map_as_it_is():
    volume = blob_map("C1", 32, np.eye(3), seed=1)
    found = find_symmetry_axes(volume, 4.0, "C1", recentre=False)
    np.testing.assert_array_equal(found.rotation, np.eye(3))
    assert correlation(found.volume, volume) > 0.9999


@pytest.mark.parametrize("volume, pixel_size_A, symmetry, options, message", [
    (np.zeros((16, 16, 16)), 1.0, "D2", {}, "blank"),
    (np.full((16, 16, 16), np.nan), 1.0, "D2", {}, "NaN"),
    (np.ones((16, 16, 8)), 1.0, "D2", {}, "cubic"),
    (np.random.default_rng(0).normal(size=(16,) * 3), -1.0, "D2", {}, "pixel_size_A"),
    (np.random.default_rng(0).normal(size=(16,) * 3), 1.0, "Q2", {}, "unknown symmetry group"),
    (np.random.default_rng(0).normal(size=(16,) * 3), 1.0, "D2", {"max_box": 8}, "max_box"),
    (np.random.default_rng(0).normal(size=(16,) * 3), 1.0, "D2", {"resolution_A": 0.0}, "resolution_A"),
])
def test_bad_input_is_refused(volume, pixel_size_A, symmetry, options, message):
    with pytest.raises(PrimeInputError, match=message):
        find_symmetry_axes(volume, pixel_size_A, symmetry, **options)


# ------------------------------------------------------------ the command

def prime(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "prime_plugin.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def printed_rotation(text, pattern):
    match = re.search(pattern, text)
    assert match, text
    return euler_to_matrix(*map(float, match.groups()))


def test_command_aligns_and_prints_the_rotation(tmp_path, betagal):
    volume, pixel_size_A = betagal
    rotation = random_rotation(11)
    write_volume(tmp_path / "rotated.mrc", rotate_volume(volume, rotation), pixel_size_A)
    code, out, err = prime("align_symmetry", "--i", "rotated.mrc", "--o", "aligned.mrc", "--sym", "D2", cwd=tmp_path)
    assert code == 0, err
    R = printed_rotation(out, r"rot (\S+) tilt (\S+) psi (\S+) deg")
    assert axis_disagreement_deg("D2", R, rotation.T) < TOLERANCE_DEG
    aligned, written_A = read_volume(tmp_path / "aligned.mrc")
    assert written_A == pytest.approx(pixel_size_A, abs=1e-4)
    assert correlation(aligned, symmetrise_volume(aligned, "D2")) > 0.95
    assert correlation(aligned, rotate_volume(read_volume(tmp_path / "rotated.mrc")[0], R)) > 0.99


@pytest.mark.parametrize("args, fragment", [
    (["--i", "missing.mrc", "--sym", "D2"], "missing.mrc: file not found"),
    (["--i", "map.mrc", "--sym", "X2"], "unknown symmetry group 'X2'"),
    (["--i", "map.mrc", "--sym", "D2", "--angpix", "-3"], "--angpix must be a positive number"),
    (["--i", "map.mrc", "--sym", "D2", "--box_size", "8"], "--box_size must be a whole number"),
    (["--i", "map.mrc", "--sym", "D2", "--o", "no/such/out.mrc"], "the output folder must exist"),
    (["--i", "blank.mrc", "--sym", "D2"], "blank.mrc: the map is blank"),
])
def test_command_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, fragment):
    from prime_plugin.cli import main

    write_volume(tmp_path / "map.mrc", blob_map("D2", 16, np.eye(3), seed=0), 4.0)
    write_volume(tmp_path / "blank.mrc", np.ones((16,) * 3, np.float32), 4.0)
    before = set(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    code = main(["align_symmetry", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert set(tmp_path.rglob("*")) == before


# ------------------------------------------------------------ relion_align_symmetry

def relion_rotation(relion, folder, volume, pixel_size_A, symmetry):
    """The rotation relion_align_symmetry 3.1 applies (from the angles it prints) and its output map.

    RELION's defaults (working box 64, 400 random orientations, then +-4 degrees in 2-degree
    steps) left 6 of 9 rotated beta-galactosidase maps 5 to 27 degrees off (their maps correlate
    only 0.76-0.85 with their own D2 average); its help advises a working box with Nyquist near
    20 A, and 2000 random orientations make its global search reliable: both are used here. With
    those, its +-4 degree local search still ended 2.3 and 3.8 degrees off the truth in 2 of 39
    runs (the nearest random orientation too far); +-6 (--local_search_range 3) reached it in 5 of
    5 (within 1.4 degrees: RELION's 2-degree local grid, and its clock-seeded random draws, are
    this oracle's own limit).
    """
    write_volume(folder / "in.mrc", volume, pixel_size_A)
    out = relion("relion_align_symmetry", "--i", "in.mrc", "--o", "out.mrc", "--sym", symmetry,
                 "--box_size", "32", "--nr_uniform", "2000", "--local_search_range", "3", cwd=folder)
    A = printed_rotation(out, r"refined solution is ROT = (\S+) TILT = (\S+) PSI = (\S+)")
    return A, read_volume(folder / "out.mrc")[0]


RELION_ATTEMPTS = 3  # relion_align_symmetry's random start (clock-seeded) can miss the truth: it runs again


def compare_with_relion(relion, folder, volume, pixel_size_A, symmetry, truth_R):
    """Our axes against RELION's, where RELION found the truth: a run of RELION's that ended more than
    TOLERANCE_DEG from the known truth is RELION's own miss (see relion_rotation) and is run again, at
    most RELION_ATTEMPTS times; our result is compared with RELION's, not with the truth alone."""
    for _ in range(RELION_ATTEMPTS):
        A, relion_map = relion_rotation(relion, folder, volume, pixel_size_A, symmetry)
        if axis_disagreement_deg(symmetry, A, truth_R) < TOLERANCE_DEG:
            break
    found = find_symmetry_axes(volume, pixel_size_A, symmetry)
    versus_relion = axis_disagreement_deg(symmetry, found.rotation, A)
    assert versus_relion < TOLERANCE_DEG, (versus_relion, axis_disagreement_deg(symmetry, A, truth_R))
    return A, relion_map, found


@pytest.mark.relion
def test_relion_align_symmetry_betagalactosidase(relion, tmp_path, betagal):
    volume, pixel_size_A = betagal
    rotation = random_rotation(12)
    rotated = rotate_volume(volume, rotation)
    A, relion_map, found = compare_with_relion(relion, tmp_path, rotated, pixel_size_A, "D2", rotation.T)
    # The printed angles are the rotation RELION applied (its output is the input rotated by A):
    # what makes the comparison above a comparison of RELION's axes.
    assert correlation(relion_map, rotate_volume(rotated, A)) > 0.9
    assert correlation(relion_map, rotate_volume(rotated, A.T)) < 0.5


@pytest.mark.relion
@pytest.mark.slow
@pytest.mark.parametrize("symmetry", ["D2", "C4", "D7", "T"])
@pytest.mark.parametrize("seed", range(2))
def test_relion_align_symmetry_blob_maps(relion, tmp_path, symmetry, seed):
    rotation = random_rotation(300 + seed)
    compare_with_relion(relion, tmp_path, blob_map(symmetry, 40, rotation, seed=seed), 4.0, symmetry, rotation.T)
