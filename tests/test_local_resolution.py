"""Local resolution (core.local_resolution, ``prime postprocess --locres``) against analytic cases and
relion_postprocess --locres (RELION 3.1).

Data, made here:
- analytic: half maps identical (white noise, seeded) on one side of the box and independent
  on the other (box 48, 2 A/px): spheres wholly on the identical side have FSC 1 at every shell
  (after Chen's correction too), so their resolution is Nyquist exactly;
- RELION: the 64^3 beta-galactosidase map of prime_plugin/data at 1.5 A/px, blurred by B = 100
  A^2, with noise in each half map whose amplitude grows with resolution ((shell / 6)^2 times
  the map's shell amplitude) and along x (0.2 + (x / 16)^2, x in voxels from the centre), so that
  the local resolution varies across the particle (3.8 to 7.9 A at sampling 15 A); mask by prime
  mask (threshold 1, extended 2 px, 4 px soft edge).

Two comparisons with RELION. With phases randomised from Nyquist (--locres_randomize_at at
Nyquist) nothing random is left: the local-resolution map must be RELION's to float precision and
the filtered map half of RELION's (RELION filters the sum of the half maps, we their average).
With the default randomisation (25 A) the maps differ by the random phases, as two RELION runs
with different seeds do: ours must agree with RELION's (within one Fourier shell) at least as
often as RELION's run with another seed does, less 5 points.
"""

import mrcfile
import numpy as np
import pytest
import scipy.fft

from prime_plugin.cli import main as prime_main
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import shell_index
from prime_plugin.core.local_resolution import local_resolution, sampling_centres, sphere_mask

BOX, APIX = 64, 1.5


def write_map(path, volume, apix=APIX):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = apix


# ---------------------------------------------------------------- geometry and analytic cases

def test_sphere_mask_is_relions_raised_cosine():
    box, centre, radius, edge = 24, (2, -3, 5), 3, 4
    mask = sphere_mask(box, centre, radius, edge)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    d = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    # RELION's raisedCosineMask(radius, radius + edge): 0.5 - 0.5 cos(pi (radius + edge - d) / edge) on the edge.
    expected = np.where(d < radius, 1.0, np.where(d > radius + edge, 0.0,
                                                  0.5 - 0.5 * np.cos(np.pi * (radius + edge - d) / edge)))
    np.testing.assert_allclose(mask, expected, atol=1e-12)


@pytest.mark.parametrize("box, step, radius", [(64, 7, 3), (64, 17, 8), (45, 6, 4)])
def test_sampling_centres_are_relions_grid(box, step, radius):
    centres = sampling_centres(box, step, radius)
    expected = [(k, i, j) for k in range(-(box // 2), box - box // 2, step)
                for i in range(-(box // 2), box - box // 2, step) for j in range(-(box // 2), box - box // 2, step)
                if np.sqrt(k * k + i * i + j * j) < box // 2 - radius]
    assert sorted(map(tuple, centres.tolist())) == sorted(expected)


def test_identical_halves_give_nyquist_and_independent_halves_less():
    box, apix = 48, 2.0
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((box,) * 3)
    x = np.arange(box) - box // 2
    independent = x[None, None, :] > -2  # x >= -1: the halves differ there
    independent = np.broadcast_to(independent, (box,) * 3)
    half1, half2 = shared.copy(), shared.copy()
    half1[independent], half2[independent] = rng.standard_normal((2, int(independent.sum())))
    result = local_resolution(half1, half2, apix, sampling_A=12.0, rng=0)
    assert (result.step_px, result.radius_px, result.edge_px) == (6, 3, 6)
    reach = result.centres_px[:, 2] + result.radius_px + result.edge_px  # the sphere's largest x
    inside = reach < -1
    outside = result.centres_px[:, 2] - result.radius_px - result.edge_px > -2
    assert inside.sum() >= 5 and outside.sum() >= 5
    assert np.all(result.sphere_resolution_A[inside] == 2 * apix)  # Nyquist: FSC 1 at every shell
    assert np.all(result.sphere_resolution_A[outside] > 4 * apix)
    # The map: the spheres' masks' weighted harmonic mean of their resolutions.
    weights = np.array([sphere_mask(box, c, result.radius_px, result.edge_px) for c in result.centres_px])
    total = weights.sum(axis=0)
    expected = np.where(total > 0, total / np.maximum(
        (weights / result.sphere_resolution_A[:, None, None, None]).sum(axis=0), 1e-300), 0)
    np.testing.assert_allclose(result.resolution_A, expected, rtol=1e-5)


def test_bad_settings_are_input_errors():
    half = np.random.default_rng(0).standard_normal((32,) * 3)
    with pytest.raises(PrimeInputError, match="sampling_A must be a positive"):
        local_resolution(half, half + 1, 2.0, sampling_A=0.0)
    with pytest.raises(PrimeInputError, match="randomise_at_A 1 A lies outside"):
        local_resolution(half, half + 1, 2.0, randomise_at_A=1.0)
    with pytest.raises(PrimeInputError, match="no sphere of radius"):
        local_resolution(half, half + 1, 2.0, radius_A=40.0)


# ---------------------------------------------------------------- command line and relion_postprocess --locres

@pytest.fixture(scope="module")
def varying(tmp_path_factory):
    """half1.mrc, half2.mrc, mask.mrc of varying local resolution (module docstring)."""
    from importlib.resources import files

    folder = tmp_path_factory.mktemp("locres")
    volume = mrcfile.read(str(files("prime_plugin") / "data" / "betagal_d2_64.mrc")).astype(np.float64)
    shells = shell_index(BOX)
    f = np.fft.fftfreq(BOX, 1.0 / BOX)
    s2 = (f[:, None, None] ** 2 + f[None, :, None] ** 2 + np.arange(BOX // 2 + 1)[None, None, :] ** 2) / (BOX * APIX) ** 2
    clean = scipy.fft.irfftn(scipy.fft.rfftn(volume) * np.exp(-0.25 * 100.0 * s2), s=volume.shape)
    clean /= clean.std()
    spectrum = scipy.fft.rfftn(clean)
    power = np.bincount(shells.ravel(), (np.abs(spectrum) ** 2).ravel()) / np.bincount(shells.ravel())
    amplitude = np.sqrt(power)[shells] / np.sqrt(clean.size)
    x = np.arange(BOX) - BOX // 2
    envelope = 0.2 + (np.abs(x)[None, None, :] / 16.0) ** 2
    rng = np.random.default_rng(11)
    for name in ("half1.mrc", "half2.mrc"):
        white = scipy.fft.rfftn(rng.standard_normal(clean.shape))
        write_map(folder / name, clean + scipy.fft.irfftn(white * amplitude * (shells / 6.0) ** 2, s=clean.shape)
                  * envelope)
    write_map(folder / "clean.mrc", clean)
    assert prime_main(["mask", "--i", str(folder / "clean.mrc"), "--o", str(folder / "mask.mrc"), "--threshold", "1",
                       "--extend", "2", "--soft_edge", "4"]) == 0
    return folder


def test_command_writes_the_maps_and_refuses_bad_options(varying, capsys):
    out = varying / "cli"
    assert prime_main(["postprocess", "--i", str(varying / "half1.mrc"), "--mask", str(varying / "mask.mrc"),
                       "--o", str(out), "--adhoc_bfac", "-50", "--locres"]) == 0
    assert "local resolution in" in capsys.readouterr().out
    local = mrcfile.read(out / "postprocess_locres.mrc")
    mask = mrcfile.read(varying / "mask.mrc") > 0.5
    assert np.all(local[mask] >= 2 * APIX) and np.all(local[mask] <= 50.0)
    # The noise grows with |x|: the particle's middle is better resolved than its sides.
    x = np.abs(np.arange(BOX) - BOX // 2)[None, None, :] * np.ones((BOX,) * 3)
    assert np.median(local[mask & (x < 6)]) < np.median(local[mask & (x > 14)])
    with mrcfile.open(out / "postprocess_locres_filtered.mrc") as mrc:
        assert mrc.voxel_size.x == pytest.approx(APIX) and np.isfinite(mrc.data).all() and np.any(mrc.data)
    status = prime_main(["postprocess", "--i", str(varying / "half1.mrc"), "--mask", str(varying / "mask.mrc"),
                         "--o", str(varying / "bad"), "--locres", "--locres_sampling", "0"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--locres_sampling must be a positive" in err, err
    assert not (varying / "bad").exists()


def _shell_agreement(ours, theirs, mask):
    """Fraction of mask voxels where the two maps' mean shell index (N * pixel / resolution) differs by <= 1."""
    return float(np.mean(np.abs(BOX * APIX / ours[mask] - BOX * APIX / theirs[mask]) <= 1.0))


def _run_both(relion, folder, name, *options, seed=0, ours=True):
    (folder / f"relion_{name}").mkdir()  # RELION writes its histogram beside --o
    relion("relion_postprocess", "--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc", "--o",
           f"relion_{name}/postprocess", "--locres", "--adhoc_bfac", -50, "--angpix", APIX, "--random_seed", seed, *options,
           cwd=folder)
    read = mrcfile.read
    if not ours:
        return read(folder / f"relion_{name}" / "postprocess_locres.mrc")
    assert prime_main(["postprocess", "--i", str(folder / "half1.mrc"), "--mask", str(folder / "mask.mrc"),
                       "--o", str(folder / f"prime_{name}"), "--adhoc_bfac", "-50", "--locres",
                       *[str(o) for o in options]]) == 0
    return (read(folder / f"prime_{name}" / "postprocess_locres.mrc"), read(folder / f"relion_{name}" / "postprocess_locres.mrc"),
            read(folder / f"prime_{name}" / "postprocess_locres_filtered.mrc"),
            read(folder / f"relion_{name}" / "postprocess_locres_filtered.mrc"))


@pytest.mark.relion
@pytest.mark.parametrize("sampling_A", [15.0, pytest.param(10.0, marks=pytest.mark.slow)])
def test_same_local_resolution_as_relion_without_random_phases(varying, relion, sampling_A):
    """Phases randomised from Nyquist on: no random number matters, RELION's maps to float precision."""
    ours, theirs, our_filtered, their_filtered = _run_both(relion, varying, f"nyquist{sampling_A:g}",
                                                           "--locres_sampling", sampling_A,
                                                           "--locres_randomize_at", 2 * APIX)
    mask = mrcfile.read(varying / "mask.mrc") > 0.5
    print(f"sampling {sampling_A} A: local resolution inside the mask {np.percentile(theirs[mask], [5, 50, 95])} A "
          f"(RELION), max |ours - RELION| {np.abs(ours - theirs).max():.2e} A")
    assert np.ptp(theirs[mask]) > 2.0  # the data's resolution does vary
    np.testing.assert_array_equal(ours == 0, theirs == 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    np.testing.assert_allclose(our_filtered, their_filtered / 2, atol=1e-5 * np.abs(their_filtered).max())


@pytest.mark.relion
def test_local_resolution_agrees_with_relion_as_relion_agrees_with_itself(varying, relion):
    """Default randomisation (25 A): ours against RELION's, and RELION's against RELION's with another seed."""
    ours, theirs, _, _ = _run_both(relion, varying, "random", "--locres_sampling", 15)
    again = _run_both(relion, varying, "random_seed7", "--locres_sampling", 15, seed=7, ours=False)
    mask = mrcfile.read(varying / "mask.mrc") > 0.5
    ours_vs_relion = _shell_agreement(ours, theirs, mask)
    relion_vs_relion = _shell_agreement(again, theirs, mask)
    print(f"within one shell of RELION at {100 * ours_vs_relion:.1f}% of the mask's voxels; RELION with seed 7 at "
          f"{100 * relion_vs_relion:.1f}%; medians {np.median(ours[mask]):.2f} / {np.median(theirs[mask]):.2f} A")
    assert ours_vs_relion >= relion_vs_relion - 0.05
    assert abs(np.median(ours[mask]) - np.median(theirs[mask])) < 0.05 * np.median(theirs[mask])
