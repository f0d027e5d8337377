"""Post-processing (core.postprocess, ``prime postprocess``): analytic B-factors, RELION's rules, relion_postprocess.

Data, all made here (phase randomisation itself is tested in tests/test_fsc_correction.py):
- analytic: maps whose Fourier amplitudes are exactly exp(-B s^2 / 4) (unit amplitudes with
  the phases of seeded white noise, times a known B-factor), box 64 at 1.5 A/px, so the
  Guinier plot is a straight line of slope -B/4; for the whole pipeline, two half maps of
  such a map band-limited at shell 24 (4 A) plus white noise 1% of the signal's amplitude
  there (FSC ~ 1 inside the band, ~ 0 beyond);
- RELION: the 64^3 beta-galactosidase map shipped in prime_plugin/data, declared at
  1.5 A/px, blurred by B = 150 A^2, scaled to unit sd; each half map adds independent
  noise whose amplitude is the map's own shell amplitude times (shell / 8)^2 (the FSC
  falls from 1 to ~0 between shells 4 and 20); mask by relion_mask_create (threshold
  1 sd, extended 2 px, 4 px soft edge).
"""

import mrcfile
import numpy as np
import pytest
import scipy.fft
import starfile

from prime_plugin.cli import main as prime_main
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import shell_index
from prime_plugin.core.postprocess import fit_bfactor, fsc_weights, guinier_plot, last_shell_above, postprocess

BOX, APIX = 64, 1.5


def spatial_frequency_squared(box=BOX, apix=APIX):
    """s^2 (1/A^2) on the rfftn half grid."""
    f = np.fft.fftfreq(box, 1.0 / box)
    fx = np.arange(box // 2 + 1)
    return (f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2) / (box * apix) ** 2


def unit_spectrum(seed, box=BOX):
    """rfftn half grid of amplitude 1 everywhere, Hermitian (the phases of a real white-noise map's transform)."""
    noise = scipy.fft.rfftn(np.random.default_rng(seed).standard_normal((box, box, box)))
    return noise / np.abs(noise)


def write_map(path, volume, apix=APIX):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = apix


def blurred_half_maps(seed, bfactor=150.0, noise=0.3):
    """A map of amplitudes exp(-B s^2 / 4) plus independent white noise (``noise`` x its sd) per half: the FSC
    falls from ~1 to ~0 between shells ~15 and ~30."""
    rng = np.random.default_rng(seed)
    clean = scipy.fft.irfftn(unit_spectrum(seed) * np.exp(-0.25 * bfactor * spatial_frequency_squared()),
                             s=(BOX,) * 3)
    return [clean + noise * clean.std() * rng.standard_normal(clean.shape) for _ in range(2)]


# ---------------------------------------------------------------- analytic

@pytest.mark.parametrize("bfactor", [50.0, 150.0, -80.0])
def test_guinier_fit_recovers_a_known_bfactor_exactly(bfactor):
    spectrum = unit_spectrum(0) * np.exp(-0.25 * bfactor * spatial_frequency_squared())
    x, ln = guinier_plot(spectrum, BOX, APIX)
    assert np.allclose(x, (np.arange(BOX // 2 + 1) / (BOX * APIX)) ** 2)
    fit = fit_bfactor(x, ln, 10.0, 4.0)
    # ln A(s) = -B s^2 / 4 - ln N^3 up to the spread of s^2 within a shell: B = -4 x slope, RELION's sign.
    assert -4 * fit.slope == pytest.approx(bfactor, rel=0.01)
    assert fit.intercept == pytest.approx(-3 * np.log(BOX), abs=0.01)
    assert fit.correlation > 0.999
    assert fit.n_shells == 24 - 10 + 1  # shells 10 (9.6 A) to 24 (4.0 A)


def test_whole_pipeline_recovers_a_known_bfactor():
    bfactor, band = 100.0, 24
    rng = np.random.default_rng(1)
    spectrum = unit_spectrum(2) * np.exp(-0.25 * bfactor * spatial_frequency_squared())
    spectrum[shell_index(BOX) > band] = 0
    clean = scipy.fft.irfftn(spectrum, s=(BOX,) * 3)
    edge_amplitude = np.exp(-0.25 * bfactor * (band / (BOX * APIX)) ** 2) / BOX ** 1.5  # per voxel, at the band edge
    halves = [clean + 0.01 * edge_amplitude * rng.standard_normal(clean.shape) for _ in range(2)]
    result = postprocess(*halves, np.ones_like(clean), APIX, bfactor="auto")
    assert result.resolution_A == pytest.approx(BOX * APIX / band, rel=0.05)
    assert result.bfactor_A2 == pytest.approx(-bfactor, rel=0.03)  # the B-factor that undoes the blur
    assert result.fit.highres_A == result.resolution_A and result.fit.lowres_A == 10.0
    # Sharpened Guinier curve: flat over the fit.
    g = result.guinier
    shells = np.arange(10, band + 1)
    assert np.ptp(g.sharpened[shells]) < 0.05


def test_adhoc_bfactor_multiplies_amplitudes_by_exp_minus_b_s2_over_4():
    halves = blurred_half_maps(3)
    result = postprocess(*halves, np.ones_like(halves[0]), APIX, bfactor=-60.0, low_pass_A=0)
    g = result.guinier
    kept = (g.weighted > -99) & (np.arange(len(g.weighted)) < BOX // 2)  # Nyquist's shell loses its corners
    assert kept.sum() > 10
    # Per shell, up to the spread of s^2 within the shell (the amplitudes are averaged over it).
    assert np.abs((g.sharpened - g.weighted)[kept] - 60.0 / 4 * g.resolution_squared[kept]).max() < 0.01
    assert result.fit is None and result.low_pass_A is None and result.bfactor_A2 == -60.0
    # No low-pass, no mask beyond the ones: the sharpened map is the weighted, sharpened average exactly.
    average = scipy.fft.rfftn((halves[0] + halves[1]) / 2)
    weights = np.append(fsc_weights(result.final_fsc), 0.0)[np.minimum(shell_index(BOX), BOX // 2 + 1)]
    nyquist = spatial_frequency_squared() <= (0.5 / APIX) ** 2
    expected = scipy.fft.irfftn(average * weights * np.where(nyquist, np.exp(15.0 * spatial_frequency_squared()), 0),
                                s=(BOX,) * 3)
    assert np.abs(result.sharpened - expected).max() < 1e-4 * np.abs(expected).max()


def test_fsc_weights_and_resolution_shell_follow_relion():
    curve = np.array([1.0, 0.99, 0.8, 0.5, 0.2, 0.1, 0.00005, 0.3, -0.2, 0.4])
    w = fsc_weights(curve)
    assert np.allclose(w[:6], np.sqrt(2 * curve[:6] / (1 + curve[:6])))
    assert np.all(w[6:] == 0.0)  # from the first shell below 1e-4 on, whatever comes after
    assert np.all(fsc_weights(np.array([1.0, 0.5, -0.3, 0.5]))[2:] == 0.0)
    assert last_shell_above(curve) == 4  # the last shell before the first below 0.143
    assert last_shell_above(np.ones(5)) == 4


def test_bad_arguments_are_input_errors():
    halves = blurred_half_maps(5)
    ones = np.ones_like(halves[0])
    with pytest.raises(PrimeInputError, match=r"mask values must lie in \[0, 1\]"):
        postprocess(*halves, 2 * ones, APIX)
    with pytest.raises(PrimeInputError, match="bfactor"):
        postprocess(*halves, ones, APIX, bfactor="sharp")
    with pytest.raises(PrimeInputError, match="at least 2 Fourier shells"):
        postprocess(*halves, ones, APIX, bfactor="auto", autob_lowres_A=5.0, autob_highres_A=4.9)
    with pytest.raises(PrimeInputError, match="never drops below"):
        postprocess(halves[0], halves[0], ones, APIX)


# ---------------------------------------------------------------- command line and relion_postprocess

@pytest.fixture(scope="module")
def half_maps(tmp_path_factory):
    """Folder with half1.mrc, half2.mrc and clean.mrc (see the module docstring)."""
    from importlib.resources import files

    volume = mrcfile.read(str(files("prime_plugin") / "data" / "betagal_d2_64.mrc")).astype(np.float64)
    shells = shell_index(BOX)
    spectrum = scipy.fft.rfftn(volume) * np.exp(-0.25 * 150.0 * spatial_frequency_squared())
    clean = scipy.fft.irfftn(spectrum, s=volume.shape)
    clean /= clean.std()
    spectrum = scipy.fft.rfftn(clean)
    power = np.bincount(shells.ravel(), (np.abs(spectrum) ** 2).ravel()) / np.bincount(shells.ravel())
    amplitude = np.sqrt(power)[shells] / np.sqrt(clean.size)
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("postprocess")
    for name in ("half1.mrc", "half2.mrc"):
        white = scipy.fft.rfftn(rng.standard_normal(clean.shape))
        write_map(folder / name, clean + scipy.fft.irfftn(white * amplitude * (shells / 8.0) ** 2, s=clean.shape))
    write_map(folder / "clean.mrc", clean)
    return folder


def test_command_writes_relions_layout(half_maps, capsys):
    mask = np.ones((BOX,) * 3, np.float32)
    write_map(half_maps / "ones.mrc", mask)
    out = half_maps / "cli"
    assert prime_main(["postprocess", "--i", str(half_maps / "half1.mrc"), "--mask", str(half_maps / "ones.mrc"),
                       "--o", str(out), "--adhoc_bfac", "-50"]) == 0
    assert "FINAL RESOLUTION" in capsys.readouterr().out
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "fsc.png", "guinier.png"):
        assert (out / name).stat().st_size > 0
    blocks = starfile.read(out / "postprocess.star", always_dict=True)
    assert blocks["general"]["rlnUnfilteredMapHalf2"] == str(half_maps / "half2.mrc")  # half1 -> half2, as RELION
    assert blocks["general"]["rlnBfactorUsedForSharpening"] == -50.0
    assert list(blocks["guinier"].columns) == ["rlnResolutionSquared", "rlnLogAmplitudesOriginal",
                                               "rlnLogAmplitudesWeighted", "rlnLogAmplitudesSharpened"]
    with mrcfile.open(out / "postprocess.mrc") as mrc:
        assert mrc.voxel_size.x == pytest.approx(APIX)


def bad_inputs(folder):
    half1 = mrcfile.read(folder / "half1.mrc")
    mask = np.ones_like(half1)
    write_map(folder / "small_half2.mrc", half1[:48, :48, :48])
    write_map(folder / "apix_half2.mrc", mrcfile.read(folder / "half2.mrc"), apix=2.0)
    write_map(folder / "high_mask.mrc", 1.5 * mask)
    write_map(folder / "small_mask.mrc", mask[:48, :48, :48])
    write_map(folder / "good_mask.mrc", mask)
    return {
        "different box": (["--i2", "small_half2.mrc"], "small_half2.mrc: box 48 differs from half map 1's 64"),
        "different pixel size": (["--i2", "apix_half2.mrc"], "apix_half2.mrc: pixel size 2 A in the header differs"),
        "mask above 1": (["--i2", "half2.mrc", "--mask", "high_mask.mrc"], "high_mask.mrc: mask values must lie in"),
        "mask of another size": (["--mask", "small_mask.mrc"], "small_mask.mrc: mask box 48 differs"),
        "missing file": (["--i2", "missing_half2.mrc"], "missing_half2.mrc: file not found"),
        "same map twice": (["--i2", "half1.mrc"], "half1.mrc: is the same map as half map 1"),
    }


@pytest.mark.parametrize("case", ["different box", "different pixel size", "mask above 1", "mask of another size",
                                  "missing file", "same map twice"])
def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(half_maps, capsys, monkeypatch, case):
    monkeypatch.chdir(half_maps)
    options, message = bad_inputs(half_maps)[case]
    arguments = {"--i": "half1.mrc", "--mask": "good_mask.mrc", "--o": f"bad_{case.replace(' ', '_')}"}
    for flag, value in zip(options[::2], options[1::2]):
        arguments[flag] = value
    status = prime_main(["postprocess", *[item for pair in arguments.items() for item in pair]])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert not (half_maps / arguments["--o"]).exists()


@pytest.mark.relion
def test_same_resolution_and_bfactor_as_relion_postprocess(half_maps, relion):
    relion("relion_mask_create", "--i", "clean.mrc", "--o", "mask.mrc", "--ini_threshold", 1.0,
           "--extend_inimask", 2, "--width_soft_edge", 4, cwd=half_maps)
    assert prime_main(["postprocess", "--i", str(half_maps / "half1.mrc"), "--mask", str(half_maps / "mask.mrc"),
                       "--o", str(half_maps / "prime"), "--auto_bfac"]) == 0
    ours = starfile.read(half_maps / "prime" / "postprocess.star", always_dict=True)
    # Same fit range as ours (RELION 3.1 fits up to Nyquist by default) and a low-pass at the final resolution
    # (--low_pass -1; RELION 3.1 filters only when asked).
    (half_maps / "relion").mkdir()
    relion("relion_postprocess", "--i", "half1.mrc", "--mask", "mask.mrc", "--o", "relion/postprocess",
           "--auto_bfac", "--autob_highres", ours["general"]["rlnFinalResolution"], "--low_pass", -1, cwd=half_maps)
    theirs = starfile.read(half_maps / "relion" / "postprocess.star", always_dict=True)

    assert list(ours["general"]) == list(theirs["general"])
    for block in ("fsc", "guinier"):
        assert list(ours[block].columns) == list(theirs[block].columns)
    # Resolution: RELION's last shell at or above 0.143 against our interpolated crossing, within one shell.
    relion_shell = BOX * APIX / theirs["general"]["rlnFinalResolution"]
    our_shell = BOX * APIX / ours["general"]["rlnFinalResolution"]
    print(f"resolution: RELION {theirs['general']['rlnFinalResolution']:.3f} A (shell {relion_shell:.2f}), prime "
          f"{ours['general']['rlnFinalResolution']:.3f} A (shell {our_shell:.2f}); B: RELION "
          f"{theirs['general']['rlnBfactorUsedForSharpening']:.1f}, prime {ours['general']['rlnBfactorUsedForSharpening']:.1f}")
    assert 10 < relion_shell < 30 and abs(our_shell - relion_shell) <= 1.0, (our_shell, relion_shell)
    # B-factor within 10% (the corrected FSCs differ by RELION's random phases, and so do the FSC weights).
    b_ours, b_relion = ours["general"]["rlnBfactorUsedForSharpening"], theirs["general"]["rlnBfactorUsedForSharpening"]
    assert b_relion < -50 and abs(b_ours - b_relion) <= 0.1 * abs(b_relion), (b_ours, b_relion)
    # Deterministic columns: the same to the STAR file's 6 digits.
    for block, column in (("fsc", "rlnFourierShellCorrelationUnmaskedMaps"), ("fsc", "rlnFourierShellCorrelationMaskedMaps"),
                          ("fsc", "rlnFourierShellCorrelationParticleMaskFraction"),
                          ("guinier", "rlnResolutionSquared"), ("guinier", "rlnLogAmplitudesOriginal")):
        assert np.abs(ours[block][column].to_numpy() - theirs[block][column].to_numpy()).max() < 1e-4, column
    assert ours["general"]["rlnRandomiseFrom"] == pytest.approx(theirs["general"]["rlnRandomiseFrom"], abs=1e-4)
    # Given RELION's corrected FSC, the weighting, the Guinier curve and the fit are RELION's to the digits it writes:
    # the B-factors above differ only through the random phases.
    half1, half2 = (mrcfile.read(half_maps / name).astype(np.float64) for name in ("half1.mrc", "half2.mrc"))
    weights = np.append(fsc_weights(theirs["fsc"]["rlnFourierShellCorrelationCorrected"].to_numpy()), 0.0)
    spectrum = scipy.fft.rfftn((half1 + half2) / 2) * weights[np.minimum(shell_index(BOX), BOX // 2 + 1)]
    x, weighted = guinier_plot(spectrum, BOX, APIX)
    assert np.abs(weighted - theirs["guinier"]["rlnLogAmplitudesWeighted"].to_numpy()).max() < 1e-4
    fit = fit_bfactor(x, weighted, 10.0, ours["general"]["rlnFinalResolution"])
    assert 4 * fit.slope == pytest.approx(b_relion, rel=1e-4)
    assert fit.intercept == pytest.approx(theirs["general"]["rlnFittedInterceptGuinierPlot"], abs=1e-4)
    assert fit.correlation == pytest.approx(theirs["general"]["rlnCorrelationFitGuinierPlot"], abs=1e-5)
    # The maps: sharpened, and masked, nearly the same.
    for name in ("postprocess.mrc", "postprocess_masked.mrc"):
        a = mrcfile.read(half_maps / "prime" / name).ravel()
        b = mrcfile.read(half_maps / "relion" / name).ravel()
        print(f"{name}: correlation {np.corrcoef(a, b)[0, 1]:.5f}")
        assert np.corrcoef(a, b)[0, 1] > 0.99, name
