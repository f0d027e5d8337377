"""Projector and back-projector: adjointness, analytic cases, and relion_project as the oracle."""

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from prime_plugin.core.ctf import CtfParams, ctf_image
from prime_plugin.core.fourier import fsc
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.gridding import GriddingKernel
from prime_plugin.core.projector import FourierProjector
from prime_plugin.core.reconstruct import Backprojector, FourierSums, backproject, reconstruct_volume


def correlation(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def random_ctfs(rng, n, phase_plate=False):
    defocus_u = rng.uniform(10000.0, 30000.0, n)
    return CtfParams(defocus_u, defocus_u * rng.uniform(0.85, 1.0, n), rng.uniform(-180, 180, n),
                     np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1),
                     phase_shift_deg=rng.uniform(0, 90, n) if phase_plate else np.zeros(n))


@pytest.fixture(scope="module")
def ribosome64(shared_data):
    """The shared ribosome map cropped to 64^3 (centre 32 stays at box // 2), 5 A/px."""
    volume = mrcfile.read(shared_data / "ribosome70S_65px.mrc").astype(np.float32)
    return np.ascontiguousarray(volume[:64, :64, :64])


@pytest.mark.parametrize("box", [24, 25])
@pytest.mark.parametrize("kernel", [GriddingKernel(), GriddingKernel("linear")], ids=["kaiser_bessel", "linear"])
def test_projector_and_backprojector_are_adjoint(box, kernel):
    """<P v, u> = <v, P^T u> for random v, u, with shifts and CTFs, odd and even boxes."""
    rng = np.random.default_rng(box)
    n = 6
    volume = rng.normal(size=(box,) * 3).astype(np.float32)
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    rotations = Rotation.random(n, random_state=box).as_matrix()
    shifts = rng.uniform(-4, 4, (n, 2))
    ctf = ctf_image(random_ctfs(rng, n), box, 2.0, rfft=True)
    projected = FourierProjector(volume, kernel=kernel).project(rotations, shifts, ctf)
    sums = FourierSums.zeros(box)
    Backprojector(box, kernel=kernel).insert_images(sums, images, rotations, shifts, ctf)
    back = backproject(sums, kernel=kernel)
    lhs = float(np.dot(projected.ravel().astype(np.float64), images.ravel()))
    rhs = float(np.dot(volume.ravel().astype(np.float64), back.ravel()))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    # A wrong adjoint (e.g. without the shift conjugation) would not pass: check the test can fail.
    sums_wrong = FourierSums.zeros(box)
    Backprojector(box, kernel=kernel).insert_images(sums_wrong, images, rotations, -shifts, ctf)
    wrong = float(np.dot(volume.ravel().astype(np.float64), backproject(sums_wrong, kernel=kernel).ravel()))
    assert abs(lhs - wrong) > 1e-3 * abs(lhs)


def test_gridding_kernel_transform_matches_the_analytic_kaiser_bessel_transform():
    kernel = GriddingKernel()
    M, W, beta = 128, kernel.width, kernel.beta
    x = np.arange(-M // 2, M // 2)
    z = np.sqrt(beta ** 2 - (np.pi * W * x / M) ** 2 + 0j)
    analytic = (W / np.i0(beta) * np.sinh(z) / z).real
    np.testing.assert_allclose(kernel.fourier_transform(x, M), analytic, rtol=1e-6)


def gaussian_blobs(box, seed, n_blobs=5):
    """A volume of anisotropic 3D Gaussians and a function giving its exact projections.

    The projection of a Gaussian (mean mu, covariance S) at matrix A is the 2D
    Gaussian of mean (A mu)[:2] and covariance (A S A^T)[:2, :2]: an analytic oracle.
    """
    rng = np.random.default_rng(seed)
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    points3 = np.stack([x, y, z], -1).astype(float)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    points2 = np.stack([xx, yy], -1).astype(float)
    blobs = [(rng.uniform(-box / 6, box / 6, 3), np.diag(rng.uniform(2, 6, 3))) for _ in range(n_blobs)]

    def density(points, mean, cov):
        d = points - mean
        return np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)) / np.sqrt(
            np.linalg.det(2 * np.pi * cov))

    volume = sum(density(points3, mu, cov) for mu, cov in blobs).astype(np.float32)

    def exact_projection(A):
        return sum(density(points2, (A @ mu)[:2], (A @ cov @ A.T)[:2, :2]) for mu, cov in blobs)

    return volume, exact_projection


@pytest.mark.parametrize("box", [40, 41])
@pytest.mark.parametrize("kernel, bound", [(GriddingKernel(), 5e-3), (GriddingKernel(width=4), 5e-4),
                                           (GriddingKernel("linear"), 2e-2)], ids=["kb3", "kb4", "linear"])
def test_projections_of_gaussians_are_exact_to_the_kernel_accuracy(box, kernel, bound):
    """Relative RMS error against analytic projections: ~3.4e-3 (KB width 3, the default), ~3.6e-4
    (width 4), ~1e-2 (trilinear, RELION's choice), measured at boxes 48/49."""
    volume, exact_projection = gaussian_blobs(box, seed=box)
    rotations = Rotation.random(8, random_state=box).as_matrix()
    ours = FourierProjector(volume, kernel=kernel).project(rotations)
    exact = np.array([exact_projection(A) for A in rotations])
    error = np.sqrt(((ours - exact) ** 2).sum() / (exact ** 2).sum())
    assert error < bound


@pytest.mark.parametrize("box", [32, 33])
def test_zero_angles_project_along_z_and_origins_shift_as_relion(box):
    """rot = tilt = psi = 0 is the plain sum over z (CONVENTIONS.md); origin (+3, -2) moves it by (-3, +2)."""
    volume, _ = gaussian_blobs(box, seed=1)
    projector = FourierProjector(volume)
    expected = volume.sum(axis=0)
    assert correlation(projector.project(np.eye(3)[None])[0], expected) > 0.9999
    shifted = projector.project(np.eye(3)[None], shifts_px=[[3.0, -2.0]])[0]
    assert correlation(shifted, np.roll(expected, (2, -3), axis=(0, 1))) > 0.9999


def write_relion_star(path, angles, shifts_A, ctf, box, pixel_size_A):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [pixel_size_A], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    n = len(angles)
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1}@dummy.mrcs" for i in range(n)],
                              "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1],
                              "rlnAnglePsi": angles[:, 2], "rlnOriginXAngst": shifts_A[:, 0],
                              "rlnOriginYAngst": shifts_A[:, 1], "rlnDefocusU": ctf.defocus_u_A,
                              "rlnDefocusV": ctf.defocus_v_A, "rlnDefocusAngle": ctf.defocus_angle_deg,
                              "rlnPhaseShift": ctf.phase_shift_deg, "rlnOpticsGroup": 1})
    starfile.write({"optics": optics, "particles": particles}, path, float_format="%.8f")


@pytest.mark.relion
def test_projections_match_relion_project(ribosome64, tmp_path, relion):
    """30 random orientations, shifts up to 5 px, astigmatic CTFs: correlation >= 0.99 per image."""
    rng = np.random.default_rng(7)
    n, box, pixel = 30, 64, 5.0
    angles = np.column_stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                              rng.uniform(-180, 180, n)])
    radius = 5.0 * np.sqrt(rng.uniform(0, 1, n))
    direction = rng.uniform(0, 2 * np.pi, n)
    shifts_px = np.column_stack([radius * np.cos(direction), radius * np.sin(direction)])
    ctf = random_ctfs(rng, n, phase_plate=True)
    with mrcfile.new(tmp_path / "map.mrc") as mrc:
        mrc.set_data(ribosome64)
        mrc.voxel_size = pixel
    write_relion_star(tmp_path / "angles.star", angles, shifts_px * pixel, ctf, box, pixel)
    relion("relion_project", "--i", "map.mrc", "--o", "proj", "--ang", "angles.star", "--ctf",
           "--angpix", pixel, cwd=tmp_path)
    theirs = mrcfile.read(tmp_path / "proj.mrcs")
    written = starfile.read(tmp_path / "angles.star")["particles"]
    ctf_written = CtfParams(*(written[c].to_numpy() for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")),
                            np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1),
                            phase_shift_deg=written["rlnPhaseShift"].to_numpy())
    rotations = euler_to_matrix(*written[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T)
    shifts = written[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pixel
    ours = FourierProjector(ribosome64).project(rotations, shifts, ctf_image(ctf_written, box, pixel, rfft=True))
    scores = [correlation(a, b) for a, b in zip(ours, theirs)]
    assert min(scores) >= 0.99, scores
    # The same images at the wrong shift sign correlate clearly worse: the test can fail.
    flipped = FourierProjector(ribosome64).project(rotations, -shifts, ctf_image(ctf_written, box, pixel, rfft=True))
    assert np.median([correlation(a, b) for a, b in zip(flipped, theirs)]) < 0.9


def test_noise_free_reconstruction_recovers_the_map(ribosome64):
    """Project 3,000 random views, insert them, reconstruct: FSC with the truth >= 0.98 to 0.9 Nyquist."""
    rotations = Rotation.random(3000, random_state=3).as_matrix()
    images = FourierProjector(ribosome64).project(rotations)
    sums = FourierSums.zeros(64)
    Backprojector(64).insert_images(sums, images, rotations)
    volume = reconstruct_volume(sums)
    curve = fsc(volume, ribosome64)
    assert curve[1:29].min() >= 0.98, curve
    assert float((volume * ribosome64).sum() / (ribosome64 * ribosome64).sum()) == pytest.approx(1.0, abs=0.01)


def test_symmetry_mates_are_inserted():
    """Inserting each view with D2 operators equals inserting all four mates explicitly."""
    from prime_plugin.core.symmetry import symmetry_operators

    rng = np.random.default_rng(5)
    box = 20
    images = rng.normal(size=(5, box, box)).astype(np.float32)
    rotations = Rotation.random(5, random_state=5).as_matrix()
    ops = symmetry_operators("D2")
    with_ops = FourierSums.zeros(box)
    Backprojector(box, symmetry_ops=ops).insert_images(with_ops, images, rotations)
    explicit = FourierSums.zeros(box)
    mates = np.einsum("kij,sjl->ksil", rotations, ops).reshape(-1, 3, 3)
    Backprojector(box).insert_images(explicit, np.repeat(images, 4, axis=0), mates)
    np.testing.assert_allclose(with_ops.U, explicit.U, atol=1e-3)
    np.testing.assert_allclose(with_ops.rho, explicit.rho, atol=1e-4)


def test_fourier_sums_add_scale_and_save(tmp_path):
    rng = np.random.default_rng(4)
    a = FourierSums.zeros(8)
    a.U[:] = rng.normal(size=a.U.shape) + 1j * rng.normal(size=a.U.shape)
    a.rho[:] = rng.uniform(size=a.rho.shape)
    b = a.scaled(0.25) + a
    np.testing.assert_allclose(b.U, 1.25 * a.U, rtol=1e-6)
    b.save(tmp_path / "sums.npz")
    c = FourierSums.load(tmp_path / "sums.npz")
    np.testing.assert_array_equal(c.U, b.U)
    np.testing.assert_array_equal(c.rho, b.rho)
    assert (c.box, c.padding) == (8, 2.0)
