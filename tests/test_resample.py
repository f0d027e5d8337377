"""resample_volume: Fourier cropping/padding of the pixel size, real-space crop/pad of the box.

Oracles: the identity, an analytic Gaussian (its width in Angstrom is physical),
a round trip through a coarser grid of a map band-limited below its Nyquist, and
relion_image_handler --rescale_angpix on such a map.
"""

import numpy as np
import pytest

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import low_pass
from prime_plugin.core.mrc import read_volume, write_volume
from prime_plugin.core.resample import crop_or_pad, resample_volume


def gaussian(box, pixel_size_A, sigma_A, centre_offset_A=(0.0, 0.0, 0.0)):
    """exp(-r^2 / 2 sigma^2) sampled on a box^3 grid, centre at box // 2 (+ offset (z, y, x) in A)."""
    axis = (np.arange(box) - box // 2) * pixel_size_A
    z, y, x = (axis - offset for offset in centre_offset_A)
    r2 = z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2
    return np.exp(-0.5 * r2 / sigma_A ** 2)


def random_map(box, seed=0):
    return np.random.default_rng(seed).normal(size=(box,) * 3)


@pytest.mark.parametrize("box", [16, 17])
def test_same_pixel_size_is_identity(box):
    volume = random_map(box)
    for kwargs in ({}, {"new_pixel_size_A": 2.0}, {"new_box": box}, {"new_pixel_size_A": 2.0, "new_box": box}):
        out, pixel_A = resample_volume(volume, 2.0, **kwargs)
        np.testing.assert_array_equal(out, volume)
        assert pixel_A == 2.0 and out is not volume


@pytest.mark.parametrize("box, new_box", [(48, 32), (48, 72), (45, 30), (45, 61), (40, 57), (41, 60)])
def test_gaussian_keeps_its_width_in_angstrom(box, new_box):
    pixel_A, sigma_A = 2.0, 6.0
    offset_A = (1.3, -2.1, 0.7)  # off-centre, so a lost half pixel would show
    new_pixel_A = box * pixel_A / new_box
    out, achieved_A = resample_volume(gaussian(box, pixel_A, sigma_A, offset_A), pixel_A, new_pixel_size_A=new_pixel_A)
    assert out.shape == (new_box,) * 3
    assert achieved_A == pytest.approx(new_pixel_A, rel=1e-12)
    np.testing.assert_allclose(out, gaussian(new_box, new_pixel_A, sigma_A, offset_A), atol=1e-6)


def test_constant_map_stays_constant_and_float32_stays_float32():
    out, _ = resample_volume(np.full((20, 20, 20), 3.5, dtype=np.float32), 1.0, new_pixel_size_A=1.6)
    assert out.dtype == np.float32 and out.shape == (12, 12, 12)
    np.testing.assert_allclose(out, 3.5, rtol=1e-5)


@pytest.mark.parametrize("box", [48, 49])
def test_down_then_up_returns_a_band_limited_map(box):
    pixel_A = 2.0
    # Low-pass well inside the coarse grid's Nyquist (4 A/px: 8 A): 12 A plus a 2-shell edge.
    volume = low_pass(random_map(box), 12.0, pixel_A).astype(np.float64)
    coarse, coarse_A = resample_volume(volume, pixel_A, new_pixel_size_A=4.0)
    assert coarse.shape[0] == round(box / 2)
    back, back_A = resample_volume(coarse, coarse_A, new_pixel_size_A=pixel_A)
    assert back_A == pytest.approx(pixel_A)
    np.testing.assert_allclose(back, volume, atol=1e-5 * np.abs(volume).max())


def test_up_then_down_is_exact_for_any_map():
    volume = random_map(16)
    fine, fine_A = resample_volume(volume, 3.0, new_pixel_size_A=2.0)
    back, _ = resample_volume(fine, fine_A, new_pixel_size_A=3.0)
    np.testing.assert_allclose(back, volume, atol=1e-12)


@pytest.mark.parametrize("box, new_box", [(16, 24), (16, 11), (15, 20), (15, 8), (16, 16)])
def test_crop_and_pad_keep_the_centre(box, new_box):
    volume = np.zeros((box,) * 3)
    volume[box // 2, box // 2, box // 2] = 1.0
    volume[box // 2, box // 2 + 2, box // 2 - 3] = 2.0
    out, pixel_A = resample_volume(volume, 1.5, new_box=new_box)
    assert out.shape == (new_box,) * 3 and pixel_A == 1.5
    c = new_box // 2
    assert out[c, c, c] == 1.0 and out[c, c + 2, c - 3] == 2.0
    assert out.sum() == 3.0
    np.testing.assert_array_equal(crop_or_pad(out, box), volume)


def test_bad_input_is_refused():
    with pytest.raises(PrimeInputError, match="cubic"):
        resample_volume(np.zeros((8, 8, 9)), 1.0)
    with pytest.raises(PrimeInputError, match="pixel size"):
        resample_volume(np.zeros((8, 8, 8)), 0.0)
    with pytest.raises(PrimeInputError, match="new pixel size"):
        resample_volume(np.zeros((8, 8, 8)), 1.0, new_pixel_size_A=-2.0)
    with pytest.raises(PrimeInputError, match="box"):
        resample_volume(np.zeros((8, 8, 8)), 1.0, new_box=0)


@pytest.mark.relion
@pytest.mark.parametrize("new_pixel_A", [8.0, 4.0])
def test_matches_relion_image_handler_rescale(relion, shared_data, tmp_path, new_pixel_A):
    volume, _ = read_volume(shared_data / "ribosome70S_65px.mrc")
    volume = low_pass(crop_or_pad(volume * 1e4, 64), 20.0, 5.0)  # band-limited below 8 A/px's Nyquist
    write_volume(tmp_path / "in.mrc", volume, 5.0)
    relion("relion_image_handler", "--i", "in.mrc", "--angpix", 5, "--rescale_angpix", new_pixel_A,
           "--o", "out.mrc", cwd=tmp_path)
    theirs, their_A = read_volume(tmp_path / "out.mrc")
    ours, our_A = resample_volume(volume, 5.0, new_pixel_size_A=new_pixel_A)
    assert ours.shape == theirs.shape and our_A == pytest.approx(their_A)
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max())
