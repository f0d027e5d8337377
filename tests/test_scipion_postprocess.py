"""ProtPrimePostprocess in a real pyworkflow project, headless (../shared/docs/SCIPION.md).

Data made here: the 64^3 beta-galactosidase map shipped in prime_plugin/data at 1.5 A/px,
blurred by B = 150 A^2, and two half maps with independent noise that grows with resolution
(the FSC falls from 1 to 0 between shells ~4 and ~20, as in tests/test_postprocess.py),
imported as a Volume with half maps; the mask from prime mask, imported as a VolumeMask. The
oracle of the protocol's plumbing is the ``prime postprocess`` command run directly with the
same options: the protocol adds no numerics, so its outputs must be the command's. Skips
without Scipion (fails with PRIME_REQUIRE_SCIPION=1).
"""

import os
import shlex
from importlib.resources import files

import mrcfile
import numpy as np
import pytest
import scipy.fft
import starfile

from prime_plugin.cli import build_parser
from prime_plugin.cli import main as prime_main
from prime_plugin.core.fourier import shell_index

BOX, APIX = 64, 1.5


def write_map(path, volume, apix=APIX):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = apix


def make_half_maps(folder):
    """half1.mrc, half2.mrc, average.mrc and mask.mrc in ``folder`` (module docstring)."""
    volume = mrcfile.read(str(files("prime_plugin") / "data" / "betagal_d2_64.mrc")).astype(np.float64)
    shells = shell_index(BOX)
    f = np.fft.fftfreq(BOX, 1.0 / BOX)
    s2 = (f[:, None, None] ** 2 + f[None, :, None] ** 2 + np.arange(BOX // 2 + 1)[None, None, :] ** 2) / (BOX * APIX) ** 2
    clean = scipy.fft.irfftn(scipy.fft.rfftn(volume) * np.exp(-0.25 * 150.0 * s2), s=volume.shape)
    clean /= clean.std()
    spectrum = scipy.fft.rfftn(clean)
    power = np.bincount(shells.ravel(), (np.abs(spectrum) ** 2).ravel()) / np.bincount(shells.ravel())
    amplitude = np.sqrt(power)[shells] / np.sqrt(clean.size)
    rng = np.random.default_rng(7)
    halves = []
    for name in ("half1.mrc", "half2.mrc"):
        white = scipy.fft.rfftn(rng.standard_normal(clean.shape))
        halves.append(clean + scipy.fft.irfftn(white * amplitude * (shells / 8.0) ** 2, s=clean.shape))
        write_map(folder / name, halves[-1])
    write_map(folder / "average.mrc", (halves[0] + halves[1]) / 2)
    write_map(folder / "clean.mrc", clean)
    assert prime_main(["mask", "--i", str(folder / "clean.mrc"), "--o", str(folder / "mask.mrc"), "--threshold", "1",
                       "--extend", "2", "--soft_edge", "4"]) == 0


@pytest.fixture(scope="module")
def project(scipion, tmp_path_factory):
    from pyworkflow.project import Manager

    folder = tmp_path_factory.mktemp("scipion_postprocess")
    here = os.getcwd()
    project = Manager().createProject("prime_postprocess_test", location=str(folder))
    os.chdir(project.getPath())
    yield project
    os.chdir(here)


def _launch(project, prot):
    project.launchProtocol(prot, wait=True)
    assert prot.isFinished(), prot.getErrorMessage()
    return prot


@pytest.fixture(scope="module")
def imported(project, tmp_path_factory):
    """(volume with half maps, mask, the data folder), imported the usual way."""
    from pwem.protocols import ProtImportMask, ProtImportVolumes

    data = tmp_path_factory.mktemp("postprocess_data")
    make_half_maps(data)
    volume = _launch(project, project.newProtocol(
        ProtImportVolumes, objLabel="map with half maps", filesPath=str(data / "average.mrc"), samplingRate=APIX,
        setHalfMaps=True, half1map=str(data / "half1.mrc"), half2map=str(data / "half2.mrc")))
    mask = _launch(project, project.newProtocol(ProtImportMask, objLabel="mask", maskPath=str(data / "mask.mrc"),
                                                samplingRate=APIX))
    return volume.outputVolume, mask.outputMask, data


def new_postprocess(project, imported, label, **form):
    from prime_plugin.protocols import ProtPrimePostprocess

    prot = project.newProtocol(ProtPrimePostprocess, objLabel=label, **form)
    prot.inputVolume.set(imported[0])
    prot.solventMask.set(imported[1])
    return prot


@pytest.fixture(scope="module")
def postprocessed(project, imported):
    return _launch(project, new_postprocess(project, imported, "prime postprocess"))


def test_outputs_are_the_commands_own(postprocessed, imported, tmp_path):
    """The protocol's map, half maps and FSC curves are what ``prime postprocess`` writes given the same
    half maps, mask and options (the automatic B-factor, RELION's defaults elsewhere)."""
    _, _, data = imported
    assert prime_main(["postprocess", "--i", str(data / "half1.mrc"), "--i2", str(data / "half2.mrc"),
                       "--mask", str(data / "mask.mrc"), "--o", str(tmp_path), "--auto_bfac"]) == 0
    volume = postprocessed.outputVolume
    assert volume.getSamplingRate() == pytest.approx(APIX) and volume.getDim() == (BOX, BOX, BOX)
    np.testing.assert_array_equal(mrcfile.read(volume.getFileName()), mrcfile.read(tmp_path / "postprocess.mrc"))
    halves = [os.path.realpath(name) for name in volume.getHalfMaps(asList=True)]
    assert [mrcfile.read(h).tobytes() for h in halves] == [mrcfile.read(data / n).tobytes()
                                                           for n in ("half1.mrc", "half2.mrc")]
    star = starfile.read(tmp_path / "postprocess.star", always_dict=True)
    fscs = [fsc.clone() for fsc in postprocessed.outputFSCs.iterItems(orderBy="id")]  # the set reuses one item
    assert [f.getObjLabel() for f in fscs] == ["corrected", "unmasked maps", "masked maps",
                                               "phase-randomised masked maps"]
    for fsc, column in zip(fscs, ("rlnFourierShellCorrelationCorrected", "rlnFourierShellCorrelationUnmaskedMaps",
                                  "rlnFourierShellCorrelationMaskedMaps",
                                  "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps")):
        x, y = (np.array(v, float) for v in fsc.getData())
        np.testing.assert_allclose(x, star["fsc"]["rlnResolution"], rtol=1e-6)
        np.testing.assert_allclose(y, star["fsc"][column], atol=1e-6)
    # Scipion's own reading of the corrected curve gives the command's resolution (interpolated, as ours).
    final = star["general"]["rlnFinalResolution"]
    assert float(fscs[0].calculateResolution(0.143)) == pytest.approx(final, rel=0.02)
    assert f"{final:.2f} A" in " ".join(postprocessed.summary())
    assert "Chen et al. 2013" in " ".join(postprocessed.methods())
    assert not hasattr(postprocessed, "outputLocalResolution")


def test_every_form_setting_reaches_the_command(project, imported):
    """The command line the protocol runs, parsed by the real ``prime`` parser, carries the form's values."""
    _, _, data = imported
    defaults = new_postprocess(project, imported, "defaults")
    args = build_parser().parse_args(shlex.split(defaults._postprocessArguments()))
    assert (args.auto_bfac, args.adhoc_bfac, args.autob_lowres, args.autob_highres, args.low_pass, args.force_mask,
            args.random_seed, args.angpix) == (True, None, 10.0, None, None, False, 0, APIX)
    assert [os.path.realpath(p) for p in (args.i, args.i2, args.mask)] == [
        os.path.realpath(data / n) for n in ("half1.mrc", "half2.mrc", "mask.mrc")] or \
        [mrcfile.read(p).tobytes() for p in (args.i, args.i2, args.mask)] == [
        mrcfile.read(data / n).tobytes() for n in ("half1.mrc", "half2.mrc", "mask.mrc")]
    changed = new_postprocess(project, imported, "changed", bfactorMode=1, adhocBfactor=-70.0, lowPass=0.0,
                              forceMask=True, randomSeed=3)
    args = build_parser().parse_args(shlex.split(changed._postprocessArguments()))
    assert (args.auto_bfac, args.adhoc_bfac, args.low_pass, args.force_mask, args.random_seed) == (
        False, -70.0, 0.0, True, 3)
    fit = new_postprocess(project, imported, "fit range", autobLowres=12.0, autobHighres=0.0)
    args = build_parser().parse_args(shlex.split(fit._postprocessArguments()))
    assert (args.auto_bfac, args.autob_lowres, args.autob_highres) == (True, 12.0, 0.0)
    none = new_postprocess(project, imported, "no B", bfactorMode=2)
    args = build_parser().parse_args(shlex.split(none._postprocessArguments()))
    assert not args.auto_bfac and args.adhoc_bfac is None


def test_validation_names_the_problem(project, imported, tmp_path):
    from pwem.protocols import ProtImportMask, ProtImportVolumes

    assert new_postprocess(project, imported, "valid").validate() == []
    _, _, data = imported
    plain = _launch(project, project.newProtocol(ProtImportVolumes, objLabel="map without half maps",
                                                 filesPath=str(data / "average.mrc"), samplingRate=APIX))
    prot = new_postprocess(project, imported, "no half maps")
    prot.inputVolume.set(plain.outputVolume)
    assert "no half maps" in " ".join(prot.validate())
    write_map(tmp_path / "small_mask.mrc", np.ones((48,) * 3))
    small = _launch(project, project.newProtocol(ProtImportMask, objLabel="48 px mask",
                                                 maskPath=str(tmp_path / "small_mask.mrc"), samplingRate=APIX))
    prot = new_postprocess(project, imported, "small mask")
    prot.solventMask.set(small.outputMask)
    assert "48 px wide but the volume 64 px" in " ".join(prot.validate())


def test_engine_refusal_fails_the_run_with_its_reason(project, imported, tmp_path):
    """A mask the form cannot judge (values above 1) fails the run with the engine's one line."""
    from pwem.protocols import ProtImportMask

    write_map(tmp_path / "high_mask.mrc", 1.5 * np.ones((BOX,) * 3))
    high = _launch(project, project.newProtocol(ProtImportMask, objLabel="mask above 1",
                                                maskPath=str(tmp_path / "high_mask.mrc"), samplingRate=APIX))
    prot = new_postprocess(project, imported, "mask above 1")
    prot.solventMask.set(high.outputMask)
    project.launchProtocol(prot, wait=True)
    assert prot.isFailed()
    assert "prime postprocess: error:" in prot.getErrorMessage()
    assert "mask values must lie in [0, 1]" in prot.getErrorMessage()


def test_viewers_draw(postprocessed, tmp_path):
    from prime_plugin.viewers import PrimePostprocessViewer

    viewer = PrimePostprocessViewer(project=postprocessed.getProject(), protocol=postprocessed)
    viewer.setProtocol(postprocessed)
    for name, show in viewer._getVisualizeDict().items():
        views = show()
        if name == "showVolume":
            assert views[0].getPath() == postprocessed.outputVolume.getFileName()
        elif name == "showLocalResolution":
            assert not hasattr(views[0], "savefig")  # a message: this run has no local resolution
        else:
            views[0].savefig(tmp_path / f"{name}.png")
            assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name


def test_local_resolution_output_is_the_commands_own(project, imported, tmp_path):
    """With 'Estimate local resolution?' the protocol outputs the command's local-resolution map, and
    the viewer draws its histogram inside the mask."""
    from prime_plugin.viewers import PrimePostprocessViewer

    _, _, data = imported
    prot = _launch(project, new_postprocess(project, imported, "prime postprocess, local resolution",
                                            bfactorMode=1, adhocBfactor=-50.0, doLocalResolution=True,
                                            locresSampling=15.0))
    assert prime_main(["postprocess", "--i", str(data / "half1.mrc"), "--i2", str(data / "half2.mrc"),
                       "--mask", str(data / "mask.mrc"), "--o", str(tmp_path), "--adhoc_bfac", "-50", "--locres",
                       "--locres_sampling", "15", "--locres_randomize_at", "25", "--locres_minres", "50"]) == 0
    local = prot.outputLocalResolution
    assert local.getSamplingRate() == pytest.approx(APIX)
    assert prot.outputVolume.getFileName().endswith("postprocess.mrc") and prot.outputVolume.hasHalfMaps()
    np.testing.assert_array_equal(mrcfile.read(local.getFileName()),
                                  mrcfile.read(tmp_path / "postprocess_locres.mrc"))
    viewer = PrimePostprocessViewer(project=prot.getProject(), protocol=prot)
    viewer.setProtocol(prot)
    views = viewer._getVisualizeDict()["showLocalResolution"]()
    views[0].savefig(tmp_path / "locres.png")
    assert (tmp_path / "locres.png").stat().st_size > 10_000
    assert views[1].getPath() == local.getFileName()
