"""Euler angles <-> matrices, checked by algebra and against RELION's relion_project.

Oracles: an independent composition of elementary rotations, round trips, and
projections made by relion_project 3.1 of the shared 70S ribosome map (cropped
from 65^3 to 64^3 so the centre stays at box // 2, written at 5 A/px).
"""

import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from prime_plugin.core.geometry import (
    direction_to_angles,
    euler_to_matrix,
    matrix_to_euler,
    projection_direction,
    rotation_angles_deg,
)

BOX = 64
APIX = 5.0


def random_angles(n, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)


def rz(a_deg):
    """RELION's elementary Rz (rotates the frame, i.e. points by -a about z)."""
    c, s = np.cos(np.radians(a_deg)), np.sin(np.radians(a_deg))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def ry(b_deg):
    """RELION's elementary Ry."""
    c, s = np.cos(np.radians(b_deg)), np.sin(np.radians(b_deg))
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def test_matches_composed_elementary_rotations():
    rot, tilt, psi = random_angles(200, seed=1)
    composed = np.stack([rz(p) @ ry(t) @ rz(r) for r, t, p in zip(rot, tilt, psi)])
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), composed, atol=1e-14)
    np.testing.assert_allclose(euler_to_matrix(rot[0], tilt[0], psi[0]), composed[0], atol=1e-14)


def test_matrices_are_proper_rotations():
    A = euler_to_matrix(*random_angles(10_000, seed=2))
    assert A.shape == (10_000, 3, 3) and A.dtype == np.float64
    np.testing.assert_allclose(A @ A.transpose(0, 2, 1), np.broadcast_to(np.eye(3), A.shape), atol=1e-13)
    np.testing.assert_allclose(np.linalg.det(A), 1.0, atol=1e-13)


def test_round_trip_random_angles():
    rot, tilt, psi = random_angles(10_000, seed=3)
    A = euler_to_matrix(rot, tilt, psi)
    rot2, tilt2, psi2 = matrix_to_euler(A)
    np.testing.assert_allclose(euler_to_matrix(rot2, tilt2, psi2), A, atol=1e-12)
    # Inside the principal ranges the angles themselves come back.
    np.testing.assert_allclose(np.stack([rot2, tilt2, psi2]), np.stack([rot, tilt, psi]), atol=1e-9)


def test_round_trip_random_matrices():
    """Matrices not built from angles (random quaternions) survive matrix -> angles -> matrix."""
    q = np.random.default_rng(4).normal(size=(10_000, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    R = np.stack([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]).transpose(2, 0, 1)
    rot, tilt, psi = matrix_to_euler(R)
    assert np.all((tilt >= 0) & (tilt <= 180))
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), R, atol=1e-12)


@pytest.mark.parametrize("tilt", [0.0, 180.0, 1e-7, -1e-7, 180.0 - 1e-7, 1e-4, 1e-10, 360.0])
@pytest.mark.parametrize("rot, psi", [(0.0, 0.0), (33.0, -71.0), (-170.0, 170.0), (90.0, 90.0)])
def test_round_trip_gimbal_lock(rot, tilt, psi):
    A = euler_to_matrix(rot, tilt, psi)
    angles = matrix_to_euler(A)
    assert all(isinstance(a, float) for a in angles)
    np.testing.assert_allclose(euler_to_matrix(*angles), A, atol=1e-12)


@pytest.mark.parametrize("tilt, rot, psi, expected_psi", [(0.0, 30.0, 20.0, 50.0), (180.0, 30.0, 20.0, -10.0)])
def test_exact_gimbal_lock_reports_rot_zero(tilt, rot, psi, expected_psi):
    """As RELION: at tilt 0 or 180 the whole in-plane angle goes into psi, rot = 0."""
    rot2, tilt2, psi2 = matrix_to_euler(euler_to_matrix(rot, tilt, psi))
    assert (rot2, tilt2) == (0.0, tilt)
    assert psi2 == pytest.approx(expected_psi, abs=1e-12)


def test_projection_direction_is_third_row_and_inverts():
    rot, tilt, _ = random_angles(500, seed=5)
    d = projection_direction(rot, tilt)
    np.testing.assert_allclose(d, euler_to_matrix(rot, tilt, 0.0)[:, 2, :], atol=1e-15)
    rot2, tilt2 = direction_to_angles(d)
    np.testing.assert_allclose(np.stack([rot2, tilt2]), np.stack([rot, tilt]), atol=1e-9)


def strided_transcendental_calls(monkeypatch):
    """Patch numpy's SIMD-dispatched functions so that each call with a strided array argument
    (not contiguous, and not a broadcast with a zero stride) is recorded; returns the record."""
    calls = []
    for name in ("arctan2", "arccos", "arcsin", "cos", "sin", "tan", "exp", "log", "power"):
        original = getattr(np, name)

        def checked(*args, _name=name, _original=original, **kwargs):
            for a in args:
                if isinstance(a, np.ndarray) and a.size > 1 and not a.flags.c_contiguous and 0 not in a.strides:
                    calls.append((_name, a.shape, a.strides))
            return _original(*args, **kwargs)

        monkeypatch.setattr(np, name, checked)
    return calls


def test_trigonometry_never_sees_strided_views(monkeypatch):
    """numpy computes arctan2, cos, ... with SIMD code unless the input's range (stride x length)
    may overlap the output; for a strided view that range runs past the array's buffer, so
    where the heap puts the output decides between SIMD and the C library, and the angles
    differ in the last bit from run to run (this made two identical refinements differ).
    Every geometry and CTF function is therefore given strided inputs here, and must hand
    only contiguous arrays to those functions."""
    from prime_plugin.core.ctf import CtfParams, ctf_terms

    rot, tilt, psi = random_angles(300, seed=11)
    table = np.stack([rot, tilt, psi], axis=1)          # columns are strided views
    matrices = np.stack([euler_to_matrix(rot, tilt, psi)] * 2, axis=1)[:, 0]   # (n, 3, 3), strided
    directions = np.stack([projection_direction(rot, tilt)] * 2, axis=-1)[..., 0]
    ctf = np.tile(np.array([[15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1]]), (300, 1))
    calls = strided_transcendental_calls(monkeypatch)
    assert not matrices.flags.c_contiguous and not table[:, 0].flags.c_contiguous
    matrix_to_euler(matrices)
    euler_to_matrix(table[:, 0], table[:, 1], table[:, 2])
    projection_direction(table[:, 0], table[:, 1])
    direction_to_angles(directions)
    ctf_terms(CtfParams(*ctf.T))
    assert calls == []


def test_rotation_angle_is_the_angle_about_the_axis_and_ignores_symmetry_mates():
    """Analytical case: b = R(axis, theta) a is theta degrees from a; over D2's mates, a @ mate is 0 away."""
    from prime_plugin.core.symmetry import rotation_about_axis, symmetry_operators

    rng = np.random.default_rng(7)
    a = euler_to_matrix(*random_angles(50, seed=8))
    theta = rng.uniform(0, 180, 50)
    b = np.stack([rotation_about_axis(axis, t) @ m for axis, t, m in zip(rng.normal(size=(50, 3)), theta, a)])
    np.testing.assert_allclose(rotation_angles_deg(a, b), theta, atol=1e-6)
    mates = symmetry_operators("D2")
    shuffled = np.einsum("nij,njk->nik", a, mates[rng.integers(0, 4, 50)])
    np.testing.assert_allclose(rotation_angles_deg(a, shuffled, mates), 0.0, atol=1e-5)
    assert (rotation_angles_deg(a, shuffled)[np.any(np.abs(shuffled - a) > 1e-9, axis=(1, 2))] > 90).all()


def test_matrix_to_euler_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        matrix_to_euler(np.eye(4))


# ---------------------------------------------------------------- RELION oracle

def ncc(a, b):
    """Normalised cross-correlation of two images."""
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def real_space_projection(volume, A):
    """img(x, y) = sum_z v(A^T (x, y, z)), centre at box // 2, volume v[z, y, x]."""
    centre = np.array(volume.shape) // 2
    reverse = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x) index order
    M = reverse @ A.T @ reverse
    rotated = ndimage.affine_transform(volume, M, offset=centre - M @ centre, order=1)
    return rotated.sum(axis=0)


def write_angles_star(path, angles):
    """A minimal RELION 3.1 particle STAR file with the given (rot, tilt, psi) rows."""
    optics = ["rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnVoltage",
              "rlnSphericalAberration", "rlnAmplitudeContrast"]
    particles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                 "rlnOriginYAngst", "rlnOpticsGroup", "rlnImageName"]
    lines = ["# version 30001", "", "data_optics", "", "loop_"]
    lines += [f"_{name} #{i + 1}" for i, name in enumerate(optics)]
    lines += [f"1 {APIX:.6f} {BOX} 300.0 2.7 0.1", "", "# version 30001", "", "data_particles", "", "loop_"]
    lines += [f"_{name} #{i + 1}" for i, name in enumerate(particles)]
    lines += [f"{r:.6f} {t:.6f} {p:.6f} 0.0 0.0 1 {k + 1:06d}@none.mrcs" for k, (r, t, p) in enumerate(angles)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def relion_projections(relion, shared_data, tmp_path):
    """Callable: list of (rot, tilt, psi) -> (volume v[z, y, x], relion_project stack)."""
    volume = mrcfile.read(shared_data / "ribosome70S_65px.mrc")[:BOX, :BOX, :BOX].astype(np.float32)
    with mrcfile.new(tmp_path / "map.mrc") as mrc:
        mrc.set_data(np.ascontiguousarray(volume))
        mrc.voxel_size = APIX

    def project(angles):
        write_angles_star(tmp_path / "angles.star", angles)
        relion("relion_project", "--i", "map.mrc", "--o", "proj", "--ang", "angles.star",
               "--angpix", APIX, cwd=tmp_path)
        stack = mrcfile.read(tmp_path / "proj.mrcs").astype(np.float64).reshape(-1, BOX, BOX)
        assert len(stack) == len(angles)
        return volume.astype(np.float64), stack

    return project


@pytest.mark.relion
def test_relion_projection_facts(relion_projections):
    """The facts of CONVENTIONS.md, reproduced with relion_project."""
    v, proj = relion_projections([(0, 0, 0), (30, 0, 0), (0, 0, 30), (0, 90, 0)])
    assert ncc(proj[0], v.sum(axis=0)) >= 0.99
    rotated = ndimage.rotate(v.sum(axis=0), 30, reshape=False)
    assert ncc(proj[1], rotated) >= 0.98
    assert ncc(proj[2], rotated) >= 0.98
    assert ncc(proj[3], np.roll(v.sum(axis=2).T[:, ::-1], 1, axis=1)) >= 0.99


@pytest.mark.relion
def test_euler_to_matrix_is_relions(relion_projections):
    """Real-space projections with our matrix reproduce relion_project at generic angles."""
    rot, tilt, psi = random_angles(5, seed=6)
    angles = list(zip(rot, tilt, psi))
    v, proj = relion_projections(angles)
    for image, (r, t, p) in zip(proj, angles):
        A = euler_to_matrix(r, t, p)
        assert ncc(image, real_space_projection(v, A)) >= 0.98, (r, t, p)
        # Control: the inverse rotation (a plausible convention mix-up) must not match.
        assert ncc(image, real_space_projection(v, A.T)) < 0.9, (r, t, p)
