"""Mask-corrected FSC (core.fsc_correction): phase randomisation, a band-limited oracle, relion_postprocess.

Data, all made here:
- phase randomisation: seeded white-noise maps, even and odd boxes;
- band-limited oracle: 600 point atoms in a sphere of radius 18 px (box 64, 2 A/px),
  blurred by a Gaussian in Fourier space (1/e^(1/2) at shell 8) and cut off above
  shell 20 (6.4 A), so the two half maps (map + independent white noise, sigma 0.4 of
  the map's) share nothing beyond shell 20: their true FSC there is 0. The mask
  is tight on purpose (map > 1.5 sd, 2 px raised-cosine edge);
- RELION: the shared 70S ribosome (65^3 cropped to 64^3, 5 A/px, scaled to unit sd)
  plus independent white noise of 3 sd per half; soft mask from relion_mask_create
  (threshold 0.5 sd, extended 2 px, 5 px soft edge).
"""

import re

import mrcfile
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import starfile

from prime_plugin.core.fourier import fsc, resolution_at, shell_index
from prime_plugin.core.fsc_correction import corrected_fsc, randomise_phases


def half_grid_radius(box):
    f = np.fft.fftfreq(box, 1.0 / box)
    fx = np.arange(box // 2 + 1)
    return np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)


def write_map(path, volume, apix):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = apix


def last_shell_above(curve, threshold=0.143):
    """RELION's reading of a resolution: the last shell before the curve first drops below threshold."""
    below = np.nonzero(curve < threshold)[0]
    return int(below[0]) - 1 if below.size else len(curve) - 1


# ---------------------------------------------------------------- phase randomisation

@pytest.mark.parametrize("box", [32, 33], ids=["even", "odd"])
def test_randomised_map_keeps_amplitudes_and_low_shells_and_stays_real(box):
    volume = np.random.default_rng(3).standard_normal((box, box, box)).astype(np.float32)
    out = randomise_phases(volume, 6, np.random.default_rng(4))
    assert out.dtype == np.float32 and out.shape == volume.shape
    before = scipy.fft.rfftn(volume.astype(np.float64))
    after = scipy.fft.rfftn(out.astype(np.float64))
    scale = np.abs(before).max()
    # Every amplitude, the self-conjugate planes (kx = 0 and, for an even box, kx = N/2) included:
    # phases that broke Hermitian symmetry there would lose amplitude in the real output.
    assert np.abs(np.abs(after) - np.abs(before)).max() <= 1e-5 * scale
    planes = [0, box // 2] if box % 2 == 0 else [0]
    assert np.abs(np.abs(after[..., planes]) - np.abs(before[..., planes])).max() <= 1e-5 * scale
    low = shell_index(box) < 6
    assert np.abs(after[low] - before[low]).max() <= 1e-5 * scale
    assert not np.allclose(after[~low], before[~low], atol=0.1 * scale)


@pytest.mark.parametrize("box", [32, 33], ids=["even", "odd"])
def test_randomised_map_is_decorrelated_from_the_cut_off_shell_on(box):
    volume = np.random.default_rng(5).standard_normal((box, box, box)).astype(np.float32)
    curve = fsc(volume, randomise_phases(volume, 8, np.random.default_rng(6)))
    assert curve[:8].min() > 0.99999
    beyond = curve[8:]
    # A shell of n independent components correlates by chance at ~ 1 / sqrt(n) (n >= 400 here).
    assert np.abs(beyond).max() < 0.2 and abs(beyond.mean()) < 0.05, np.round(beyond, 3)


def test_radius_boundary_is_relions_split_of_the_cut_off_shell():
    box = 32
    volume = np.random.default_rng(7).standard_normal((box, box, box)).astype(np.float32)
    before = scipy.fft.rfftn(volume.astype(np.float64))
    after = scipy.fft.rfftn(randomise_phases(volume, 8, np.random.default_rng(8), boundary="radius").astype(np.float64))
    radius = half_grid_radius(box)
    kept = radius < 8
    assert np.abs(after[kept] - before[kept]).max() <= 1e-5 * np.abs(before).max()
    inner_half = (radius >= 7.5) & (radius < 8)  # in shell 8, phases kept as RELION keeps them
    assert inner_half.sum() > 100
    changed = np.abs(after - before) > 1e-3 * np.abs(before)
    assert changed[radius >= 8].mean() > 0.99


def test_randomisation_is_seeded_and_checks_its_arguments():
    volume = np.random.default_rng(9).standard_normal((16, 16, 16)).astype(np.float32)
    one = randomise_phases(volume, 3, np.random.default_rng(1))
    assert np.array_equal(one, randomise_phases(volume, 3, np.random.default_rng(1)))
    assert not np.array_equal(one, randomise_phases(volume, 3, np.random.default_rng(2)))
    with pytest.raises(ValueError, match="from_shell"):
        randomise_phases(volume, 0, np.random.default_rng(1))
    with pytest.raises(TypeError, match="Generator"):
        randomise_phases(volume, 3, 1)
    with pytest.raises(ValueError, match="boundary"):
        randomise_phases(volume, 3, np.random.default_rng(1), boundary="sphere")
    with pytest.raises(ValueError, match="cubic"):
        randomise_phases(volume[:8], 3, np.random.default_rng(1))


# ---------------------------------------------------------------- band-limited oracle

BOX, APIX, BAND_LIMIT = 64, 2.0, 20


def band_limited_half_maps(seed):
    """Two noisy half maps of a map with no Fourier content beyond shell BAND_LIMIT, and a tight mask."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((600, 3))
    atoms = directions / np.linalg.norm(directions, axis=1)[:, None] * 18 * rng.uniform(0, 1, (600, 1)) ** (1 / 3)
    points = np.zeros((BOX, BOX, BOX))
    np.add.at(points, tuple(np.rint(atoms + BOX // 2).astype(int).T), 1.0)
    shells = shell_index(BOX)
    spectrum = scipy.fft.rfftn(points) * np.exp(-0.5 * (shells / 8.0) ** 2)
    spectrum[shells > BAND_LIMIT] = 0
    clean = scipy.fft.irfftn(spectrum, s=points.shape)
    clean /= clean.std()
    halves = [(clean + 0.4 * rng.standard_normal(clean.shape)).astype(np.float32) for _ in range(2)]
    outside = scipy.ndimage.distance_transform_edt(clean <= 1.5)  # px to the nearest voxel above 1.5 sd
    mask = np.where(outside < 2.0, 0.5 + 0.5 * np.cos(np.pi * outside / 2.0), 0.0).astype(np.float32)
    return halves, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_tight_mask_inflates_the_masked_fsc_and_the_correction_removes_it(seed):
    (half1, half2), mask = band_limited_half_maps(seed)
    result = corrected_fsc(half1, half2, mask, APIX)
    tail = slice(BAND_LIMIT + 3, None)  # beyond the band limit and the mask's spread of its edge
    # The truth beyond the band limit is 0; the unmasked maps, with nothing shared there, agree.
    assert abs(result.unmasked[BAND_LIMIT + 1:].mean()) < 0.03
    # The tight mask makes the masked maps agree there (0.2-0.3 per shell) and claim ~4 A.
    assert result.masked[tail].mean() > 0.2
    assert result.res_masked_A < 0.75 * BOX * APIX / BAND_LIMIT
    # Corrected: no spurious agreement left (a slight negative bias, as RELION's, is allowed).
    assert result.corrected[tail].max() < 0.1 and result.corrected[tail].mean() > -0.1, np.round(result.corrected, 2)
    assert abs(BOX * APIX / result.res_corrected_A - BAND_LIMIT) <= 1.0
    # The randomisation starts inside the band, so the band's true signal must survive the correction.
    k = result.randomise_from_shell
    assert k == np.nonzero(result.unmasked[1:] < 0.8)[0][0] + 1 and k + 2 < BAND_LIMIT - 1
    band = slice(k + 2, BAND_LIMIT)
    assert result.corrected[band].min() > 0.6
    assert np.abs(result.corrected[band] - result.masked[band]).max() < 0.2
    # RELION's rule: masked below k + 2, Chen's formula from there on.
    assert np.array_equal(result.corrected[:k + 2], result.masked[:k + 2])
    t, n = result.masked[k + 2:], result.randomised_masked[k + 2:]
    assert np.allclose(result.corrected[k + 2:], (t - n) / (1 - n), atol=1e-12)


def test_corrected_fsc_is_deterministic_and_checks_its_input():
    (half1, half2), mask = band_limited_half_maps(0)
    first = corrected_fsc(half1, half2, mask, APIX, rng=3)
    again = corrected_fsc(half1, half2, mask, APIX, rng=np.random.default_rng(3))
    assert np.array_equal(first.corrected, again.corrected)
    assert np.array_equal(corrected_fsc(half1, half2, mask, APIX).corrected,
                          corrected_fsc(half1, half2, mask, APIX, rng=0).corrected)
    assert first.randomise_from_A == pytest.approx(BOX * APIX / first.randomise_from_shell)
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        corrected_fsc(half1, half2, mask * 2, APIX)
    with pytest.raises(ValueError, match="differ in shape"):
        corrected_fsc(half1, half2[:-1, :-1, :-1], mask, APIX)
    with pytest.raises(ValueError, match="pixel_size_A"):
        corrected_fsc(half1, half2, mask, 0.0)
    with pytest.raises(ValueError, match="never drops below"):
        corrected_fsc(half1, half1, mask, APIX)


# ---------------------------------------------------------------- relion_postprocess

@pytest.mark.relion
def test_same_curves_and_resolution_as_relion_postprocess(tmp_path, relion, ribosome):
    box, apix = 64, 5.0
    clean = ribosome / ribosome.std()
    rng = np.random.default_rng(2)
    half1, half2 = [(clean + 3.0 * rng.standard_normal(clean.shape)).astype(np.float32) for _ in range(2)]
    for name, volume in (("half1.mrc", half1), ("half2.mrc", half2), ("clean.mrc", clean)):
        write_map(tmp_path / name, volume, apix)
    relion("relion_mask_create", "--i", "clean.mrc", "--o", "mask.mrc", "--ini_threshold", 0.5,
           "--extend_inimask", 2, "--width_soft_edge", 5, cwd=tmp_path)
    # --force_mask: RELION would otherwise report the unmasked FSC in place of the corrected one
    # whenever the unmasked one reaches further. (--auto_bfac is a switch: "--auto_bfac false" turns it on.)
    (tmp_path / "out").mkdir()
    log = relion("relion_postprocess", "--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc",
                 "--angpix", apix, "--o", "out/postprocess", "--adhoc_bfac", 0, "--force_mask", cwd=tmp_path)
    blocks = starfile.read(tmp_path / "out" / "postprocess.star", always_dict=True)
    table = blocks["fsc"]
    unmasked = table["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy()
    masked = table["rlnFourierShellCorrelationMaskedMaps"].to_numpy()
    randomised = table["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"].to_numpy()
    corrected = table["rlnFourierShellCorrelationCorrected"].to_numpy()
    assert len(table) == box // 2 + 1

    ours = corrected_fsc(half1, half2, mrcfile.read(tmp_path / "mask.mrc"), apix)
    printed = float(re.search(r"randomize phases beyond:\s*([0-9.eE+-]+)", log).group(1))
    assert round(box * apix / printed) == ours.randomise_from_shell
    assert blocks["general"]["rlnRandomiseFrom"] == pytest.approx(ours.randomise_from_A, abs=1e-4)
    k = ours.randomise_from_shell

    # Unmasked and masked curves: RELION's, shell by shell (STAR files carry ~6 digits).
    assert np.abs(ours.unmasked[1:] - unmasked[1:]).max() < 1e-4
    assert np.abs(ours.masked[1:] - masked[1:]).max() < 1e-4
    # RELION's own columns obey the rule this module follows: masked below k + 2, Chen's formula above.
    assert np.abs(corrected[:k + 2] - masked[:k + 2]).max() < 1e-5
    formula = (masked[k + 2:] - randomised[k + 2:]) / (1 - randomised[k + 2:])
    assert np.abs(corrected[k + 2:] - formula).max() < 1e-4
    # Random phases differ from RELION's, so FSC_rand agrees statistically; independent phases for the
    # two halves leave it near 0 far from k (identical phases would give ~0.8 there).
    assert np.abs(ours.randomised_masked[k - 1:] - randomised[k - 1:]).max() < 0.15
    assert np.abs(randomised[k + 4:]).max() < 0.15
    assert np.abs(ours.corrected[1:] - corrected[1:]).max() < 0.15

    # Resolution: RELION's (last shell at or above 0.143), and interpolated crossings of both curves.
    relion_shell = box * apix / blocks["general"]["rlnFinalResolution"]
    assert relion_shell == pytest.approx(last_shell_above(corrected), abs=1e-3)
    assert abs(last_shell_above(ours.corrected) - relion_shell) <= 1
    ours_at = box * apix / ours.res_corrected_A
    relion_at = box * apix / resolution_at(corrected, 0.143, box, apix)
    assert abs(ours_at - relion_at) <= 1.0, (ours_at, relion_at)
