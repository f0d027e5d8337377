"""RELION's CTF model: analytic properties, layouts, and relion_project as the oracle."""

import dataclasses

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from prime_plugin.core.ctf import CtfParams, ctf_at, ctf_image, electron_wavelength_A, fourier_grid
from prime_plugin.core.errors import PrimeInputError

ASTIGMATIC = CtfParams(
    defocus_u_A=21000.0, defocus_v_A=18500.0, defocus_angle_deg=35.0,
    voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1,
)


def batch_params(n, seed, phase_plate):
    """n astigmatic CTFs with different defocus U/V/angle, some with B-factor and scale."""
    rng = np.random.default_rng(seed)
    defocus_u = rng.uniform(8000.0, 25000.0, n)
    return CtfParams(
        defocus_u_A=defocus_u,
        defocus_v_A=defocus_u - rng.uniform(300.0, 3000.0, n),
        defocus_angle_deg=rng.uniform(-180.0, 180.0, n),
        voltage_kV=np.full(n, 300.0),
        cs_mm=np.full(n, 2.7),
        amplitude_contrast=np.full(n, 0.1),
        phase_shift_deg=rng.uniform(20.0, 120.0, n) if phase_plate else np.zeros(n),
        bfactor_A2=np.where(np.arange(n) % 3 == 1, 80.0, 0.0),
        scale=np.where(np.arange(n) % 3 == 2, 0.7, 1.0),
    )


# --- analytic checks -------------------------------------------------------

def test_wavelength_known_values():
    assert electron_wavelength_A(300.0) == pytest.approx(0.019687, abs=1e-6)
    assert electron_wavelength_A(200.0) == pytest.approx(0.025079, abs=1e-6)
    assert electron_wavelength_A(np.array([300.0, 200.0])).shape == (2,)


@pytest.mark.parametrize("phase_shift_deg", [0.0, 90.0, 37.0])
def test_origin_value_is_minus_sin_of_the_constant_phase(phase_shift_deg):
    """gamma(0) = -(phase_shift + atan(Q0 / sqrt(1 - Q0^2))), CTF = -sin(gamma): +Q0 without phase plate."""
    params = dataclasses.replace(ASTIGMATIC, phase_shift_deg=phase_shift_deg, scale=0.5, bfactor_A2=100.0)
    q0 = params.amplitude_contrast
    expected = 0.5 * np.sin(np.deg2rad(phase_shift_deg) + np.arcsin(q0))
    assert ctf_at(params, 0.0, 0.0) == pytest.approx(expected, rel=1e-6)
    if phase_shift_deg == 0.0:
        assert ctf_at(params, 0.0, 0.0) == pytest.approx(0.5 * q0, rel=1e-6)


def test_point_symmetry_and_dtype():
    rng = np.random.default_rng(0)
    kx, ky = rng.uniform(-0.4, 0.4, (2, 500))
    ctf = ctf_at(ASTIGMATIC, kx, ky)
    assert ctf.dtype == np.float32 and ctf.shape == (500,)
    np.testing.assert_array_equal(ctf, ctf_at(ASTIGMATIC, -kx, -ky))
    assert not np.allclose(ctf, ctf_at(ASTIGMATIC, -kx, ky), atol=1e-2)  # astigmatism breaks the mirror symmetry


@pytest.mark.parametrize("axis_deg, defocus_field", [(0.0, "defocus_u_A"), (90.0, "defocus_v_A")])
def test_astigmatism_along_u_and_v(axis_deg, defocus_field):
    """Along U (the astigmatism angle) the CTF is the round CTF of defocus U; along U + 90 deg, of defocus V."""
    direction = np.deg2rad(ASTIGMATIC.defocus_angle_deg + axis_deg)
    k = np.linspace(0.0, 0.5, 2001)
    defocus = getattr(ASTIGMATIC, defocus_field)
    round_ctf = dataclasses.replace(ASTIGMATIC, defocus_u_A=defocus, defocus_v_A=defocus)
    along = ctf_at(ASTIGMATIC, k * np.cos(direction), k * np.sin(direction))
    np.testing.assert_allclose(along, ctf_at(round_ctf, k, 0.0), atol=2e-5)
    # zeros where -pi*lambda*dF*k^2 + pi/2*Cs*lambda^3*k^4 - asin(Q0) = -n*pi, the round CTF's zeros
    lam, cs_A = electron_wavelength_A(300.0), ASTIGMATIC.cs_mm * 1e7
    n = np.arange(1, 8)
    a, b, c = 0.5 * cs_A * lam**3, -lam * defocus, n - np.arcsin(ASTIGMATIC.amplitude_contrast) / np.pi
    k_zero = np.sqrt((-b - np.sqrt(b * b - 4 * a * c)) / (2 * a))
    assert np.abs(ctf_at(ASTIGMATIC, k_zero * np.cos(direction), k_zero * np.sin(direction))).max() < 1e-4


def test_spherical_aberration_zero_without_defocus():
    """With no defocus and Q0 = 0, gamma = pi/2 Cs lambda^3 k^4 has its first zero at k = (2 / (Cs lambda^3))^(1/4)."""
    params = CtfParams(0.0, 0.0, 0.0, voltage_kV=200.0, cs_mm=2.0, amplitude_contrast=0.0)
    k_zero = (2.0 / (2.0e7 * electron_wavelength_A(200.0) ** 3)) ** 0.25
    assert abs(ctf_at(params, k_zero, 0.0)) < 1e-5
    assert ctf_at(params, 0.9 * k_zero, 0.0) < 0 < ctf_at(params, 1.1 * k_zero, 0.0)


@pytest.mark.parametrize("box", [64, 65])
def test_rfft_layout_is_half_of_full_layout(box):
    apix = 1.7
    full = ctf_image(ASTIGMATIC, box, apix)
    half = ctf_image(ASTIGMATIC, box, apix, rfft=True)
    assert full.shape == (box, box) and half.shape == (box, box // 2 + 1)
    # full layout: origin at box // 2
    assert full[box // 2, box // 2] == ctf_at(ASTIGMATIC, 0.0, 0.0)
    assert full[box // 2 + 3, box // 2 - 5] == ctf_at(ASTIGMATIC, -5 / (box * apix), 3 / (box * apix))
    rows = np.arange(box)
    ky = np.where(rows <= box // 2, rows, rows - box)  # rfft rows, even-box Nyquist row at +N/2 (RELION)
    kx = np.arange(box // 2 + 1)
    # CTF(k) = CTF(-k): every rfft entry equals the point-mirrored entry of the full layout
    np.testing.assert_array_equal(half, full[(box // 2 - ky)[:, None], box // 2 - kx])
    inside = (box // 2 + ky < box)[:, None] & (box // 2 + kx < box)[None, :]
    direct = full[np.minimum(box // 2 + ky, box - 1)[:, None], np.minimum(box // 2 + kx, box - 1)]
    np.testing.assert_array_equal(half[inside], direct[inside])
    kx_grid, ky_grid = fourier_grid(box, apix, rfft=True)
    assert kx_grid[0, -1] == pytest.approx((box // 2) / (box * apix)) and ky_grid[box // 2, 0] > 0


def test_batch_matches_single_particles():
    params = batch_params(5, seed=3, phase_plate=True)
    stack = ctf_image(params, 48, 2.0)
    assert stack.shape == (5, 48, 48) and stack.dtype == np.float32
    kx, ky = fourier_grid(48, 2.0)
    for i in range(5):
        single = CtfParams(*(float(getattr(params, f.name)[i]) for f in dataclasses.fields(CtfParams)))
        np.testing.assert_array_equal(stack[i], ctf_image(single, 48, 2.0))
    # per-particle points (n, ...) and shared points (1, ...)
    np.testing.assert_array_equal(ctf_at(params, np.broadcast_to(kx, (5, 48, 48)), ky[None]), stack)
    with pytest.raises(ValueError, match="kx\\[None\\]"):
        ctf_at(params, kx, ky)


def test_from_star_columns_and_defaults():
    table = pd.DataFrame({
        "rlnDefocusU": [15000.0, 20000.0], "rlnDefocusV": [14000.0, 19500.0], "rlnDefocusAngle": [10.0, -45.0],
        "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 2.0], "rlnAmplitudeContrast": [0.1, 0.07],
        "rlnCtfBfactor": [0.0, 50.0],
    })
    params = CtfParams.from_star(table)
    assert len(params) == 2 and params.is_batch()
    np.testing.assert_array_equal(params.voltage_kV, [300.0, 200.0])
    np.testing.assert_array_equal(params.bfactor_A2, [0.0, 50.0])
    np.testing.assert_array_equal(params.phase_shift_deg, [0.0, 0.0])
    np.testing.assert_array_equal(params.scale, [1.0, 1.0])
    with pytest.raises(PrimeInputError, match="rlnDefocusAngle"):
        CtfParams.from_star(table.drop(columns="rlnDefocusAngle"), path="particles.star")
    with pytest.raises(PrimeInputError, match="rlnAmplitudeContrast"):
        CtfParams.from_star(table.assign(rlnAmplitudeContrast=1.5))


# --- RELION oracle ------------------------------------------------------------

def write_map(shared_data, box, pixel_size_A, path):
    """The 65^3 ribosome cropped/padded to box^3, its centre (32) kept at box // 2."""
    source = mrcfile.read(shared_data / "ribosome70S_65px.mrc").astype(np.float32)
    offset = box // 2 - source.shape[0] // 2
    volume = np.zeros((box, box, box), np.float32)
    lo, hi = max(0, -offset), min(source.shape[0], box - offset)
    volume[lo + offset:hi + offset, lo + offset:hi + offset, lo + offset:hi + offset] = source[lo:hi, lo:hi, lo:hi]
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = pixel_size_A


def write_star(params, box, pixel_size_A, path, seed):
    """RELION 3.1 STAR: one optics group, particles with angles, shifts and per-particle CTFs."""
    rng = np.random.default_rng(seed)
    n = len(params)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [pixel_size_A],
        "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
    })
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@none.mrcs" for i in range(n)],
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-3, 3, n) * pixel_size_A, "rlnOriginYAngst": rng.uniform(-3, 3, n) * pixel_size_A,
        "rlnDefocusU": params.defocus_u_A, "rlnDefocusV": params.defocus_v_A,
        "rlnDefocusAngle": params.defocus_angle_deg, "rlnPhaseShift": params.phase_shift_deg,
        "rlnCtfBfactor": params.bfactor_A2, "rlnCtfScalefactor": params.scale, "rlnOpticsGroup": np.ones(n, int),
    })
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)


@pytest.mark.relion
@pytest.mark.parametrize("phase_plate", [False, True], ids=["no-phase-shift", "phase-shift"])
@pytest.mark.parametrize("box", [64, 65])
@pytest.mark.parametrize("pixel_size_A", [1.0, 2.5, 5.0])
def test_ctf_matches_relion_project(relion, shared_data, tmp_path, pixel_size_A, box, phase_plate):
    """Our CTF times relion_project's plain projection == relion_project --ctf, per image."""
    seed = int(10 * pixel_size_A) + box + phase_plate
    write_map(shared_data, box, pixel_size_A, tmp_path / "map.mrc")
    write_star(batch_params(6, seed, phase_plate), box, pixel_size_A, tmp_path / "particles.star", seed)
    relion("relion_project", "--i", "map.mrc", "--o", "plain", "--ang", "particles.star", cwd=tmp_path)
    relion("relion_project", "--i", "map.mrc", "--o", "withctf", "--ang", "particles.star", "--ctf", cwd=tmp_path)

    # parameters as RELION read them: from the written STAR, optics merged in per particle
    star = starfile.read(tmp_path / "particles.star")
    table = star["particles"].merge(star["optics"], on="rlnOpticsGroup", how="left")
    params = CtfParams.from_star(table, path=tmp_path / "particles.star")
    plain = mrcfile.read(tmp_path / "plain.mrcs").astype(np.float64)
    expected = mrcfile.read(tmp_path / "withctf.mrcs").astype(np.float64)
    assert plain.shape == expected.shape == (6, box, box)

    half = np.fft.irfft2(np.fft.rfft2(plain) * ctf_image(params, box, pixel_size_A, rfft=True), s=(box, box))
    centred = np.fft.fftshift(np.fft.fft2(plain), axes=(-2, -1)) * ctf_image(params, box, pixel_size_A)
    full = np.fft.ifft2(np.fft.ifftshift(centred, axes=(-2, -1))).real
    for ours in (half, full):
        rel_rms = np.sqrt(((ours - expected) ** 2).sum(axis=(1, 2)) / (expected**2).sum(axis=(1, 2)))
        assert rel_rms.max() < 1e-3, rel_rms
