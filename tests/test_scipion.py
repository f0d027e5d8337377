"""The Scipion plugin in a real pyworkflow project, headless (../shared/docs/SCIPION.md).

A RELION STAR made by relion_project from the shared ribosome map is imported with
scipion-em-relion's ProtImportParticles, the map with ProtImportVolumes, and
ProtPrimeRefine3D refines it; its outputs are checked against the true poses. Skips
without Scipion (fails with PRIME_REQUIRE_SCIPION=1, as in CI's Scipion environment).
"""

import os
import shutil
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from prime_plugin.core.fourier import fsc, resolution_at, soft_sphere_mask
from prime_plugin.core.geometry import euler_to_matrix, pose_from_projection_transform
from relion_datasets import refinement_data

BOX, PIXEL, N_PARTICLES, SNR = 64, 5.0, 500, 0.1
# The engine's own accuracy test tolerance (tests/test_refine.py) at this size.
MEDIAN_ERROR_LIMIT_DEG = 3.0

pytestmark = pytest.mark.relion


def angular_errors(true_angles_deg, rotations):
    """Angles (deg) between true rotations and found ones (n, 3, 3)."""
    truth = euler_to_matrix(*true_angles_deg.T)
    cosine = (np.trace(np.einsum("nij,nkj->nik", truth, rotations), axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


@pytest.fixture(scope="module")
def project(scipion, tmp_path_factory):
    """An empty pyworkflow project in a temporary folder, the working directory while in use."""
    from pyworkflow.project import Manager

    folder = tmp_path_factory.mktemp("scipion")
    here = os.getcwd()
    project = Manager().createProject("prime_test", location=str(folder))
    os.chdir(project.getPath())
    yield project
    os.chdir(here)


@pytest.fixture(scope="module")
def imported(project, relion, shared_data):
    """Particles (with CTF, random subsets, no alignment) and the true map, imported the usual way."""
    from pwem.protocols import ProtImportParticles, ProtImportVolumes

    data_dir = os.path.join(project.getPath(), "relion_data")
    os.makedirs(data_dir)
    data, volume = refinement_data(relion, shared_data, Path(data_dir), N_PARTICLES, SNR, seed=31)
    particles = project.newProtocol(ProtImportParticles, objLabel="particles from RELION",
                                    importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                    starFile=os.path.join(data_dir, "input.star"), magnification=10000,
                                    samplingRate=PIXEL, haveDataBeenPhaseFlipped=False)
    project.launchProtocol(particles, wait=True)
    assert particles.isFinished(), particles.getErrorMessage()
    volume_import = project.newProtocol(ProtImportVolumes, objLabel="start map",
                                        filesPath=os.path.join(data_dir, "truth.mrc"), samplingRate=PIXEL)
    project.launchProtocol(volume_import, wait=True)
    assert volume_import.isFinished(), volume_import.getErrorMessage()
    return particles, volume_import, data, volume


def new_refinement(project, imported, label):
    """A ProtPrimeRefine3D on the imported particles and map (the settings every run here uses)."""
    from prime_plugin.protocols import ProtPrimeRefine3D

    particles, volume_import, _, _ = imported
    prot = project.newProtocol(ProtPrimeRefine3D, objLabel=label, particleDiameter=300, updateFraction=0.25,
                               maxIterations=8, numberOfThreads=2)
    prot.inputParticles.set(particles.outputParticles)
    prot.referenceVolume.set(volume_import.outputVolume)
    return prot


@pytest.fixture(scope="module")
def refined(project, imported):
    prot = new_refinement(project, imported, "prime refine")
    project.launchProtocol(prot, wait=True)
    return prot


def test_refinement_protocol_finishes_with_correct_outputs(refined, imported):
    particles, _, data, truth = imported
    assert refined.isFinished(), refined.getErrorMessage()
    volume, fsc_output, output = refined.outputVolume, refined.outputFSC, refined.outputParticles
    output.loadAllProperties()
    assert volume.getSamplingRate() == pytest.approx(PIXEL)
    assert volume.getDim() == (BOX, BOX, BOX)
    half1, half2 = volume.getHalfMaps().split(",")
    assert mrcfile.read(half1).shape == (BOX,) * 3 and mrcfile.read(half2).shape == (BOX,) * 3
    assert output.getSamplingRate() == pytest.approx(PIXEL)
    assert output.hasAlignmentProj() and len(output) == N_PARTICLES
    assert output.getAcquisition().getVoltage() == pytest.approx(300.0)

    # Every particle has a 3D alignment that agrees with the truth (symmetry C1).
    matrices, ids, correlations = [], [], []
    for particle in output.iterItems(orderBy="id"):
        assert particle.hasTransform()
        matrices.append(particle.getTransform().getMatrix())
        ids.append(particle.getObjId())
        correlations.append(particle._primeCorrelation.get())
    rot, tilt, psi, origin_px = pose_from_projection_transform(np.array(matrices))
    found = euler_to_matrix(rot, tilt, psi)
    # Imported particle ids follow the STAR's row order (1-based).
    truth_rows = np.array(ids) - 1
    errors = angular_errors(data.angles_deg[truth_rows], found)
    shift_errors = np.linalg.norm(origin_px[:, :2] - data.origins_px[truth_rows], axis=1)
    print(f"\nScipion run: median angular error {np.median(errors):.2f} deg, median origin error "
          f"{np.median(shift_errors):.2f} px")
    assert np.median(errors) <= MEDIAN_ERROR_LIMIT_DEG
    assert np.median(shift_errors) < 1.0
    assert np.all(np.isfinite(correlations))

    # The FSC output is the curve of the written half maps (within the particle's soft mask).
    frequency, curve = (np.array(v, float) for v in fsc_output.getData())
    mask = soft_sphere_mask(BOX, 150.0 / PIXEL, 4.0)
    ours = fsc(mrcfile.read(half1) * mask, mrcfile.read(half2) * mask)
    n = min(len(curve), len(ours))
    np.testing.assert_allclose(curve[:n], ours[:n], atol=2e-3)
    np.testing.assert_allclose(frequency[1:n], np.arange(1, n) / (BOX * PIXEL), rtol=1e-6)
    resolution = resolution_at(ours, 0.143, BOX, PIXEL)
    assert float(fsc_output.calculateResolution(0.143)) == pytest.approx(resolution, rel=0.1)


def _poses_by_id(particles):
    """{id: (rotation matrix (3, 3), origin px (2,))} of a SetOfParticles with a 3D alignment."""
    items = list(particles.iterItems(orderBy="id"))
    rot, tilt, psi, origin_px = pose_from_projection_transform(np.array([p.getTransform().getMatrix() for p in items]))
    matrices = euler_to_matrix(rot, tilt, psi)
    return {p.getObjId(): (m, o[:2]) for p, m, o in zip(items, matrices, origin_px)}


def test_local_refinement_from_the_input_alignment(project, imported, refined):
    """A refinement's output particles (they carry a 3D alignment) refined again with 'Start from the
    particles' 3D alignment?': the run is a local one (prime refine --local), and no orientation
    leaves its window (3 x the angular uncertainty, plus a grid step) around the input's."""
    from prime_plugin.core.geometry import rotation_angles_deg

    prot = new_refinement(project, imported, "prime refine, local")
    prot.inputParticles.set(refined.outputParticles)
    prot.useInputAlignment.set(True)
    prot.localSigmaAngle.set(1.5)
    prot.maxIterations.set(3)
    project.launchProtocol(prot, wait=True)
    assert prot.isFinished(), prot.getErrorMessage()
    assert "--local --sigma_ang 1.5" in prot._refineArguments()
    before, after = _poses_by_id(refined.outputParticles), _poses_by_id(prot.outputParticles)
    assert sorted(before) == sorted(after)
    ids = sorted(before)
    moved = rotation_angles_deg(np.array([before[i][0] for i in ids]), np.array([after[i][0] for i in ids]))
    step_deg = 3.3  # the direction grid's step at the default 4000 directions in C1
    assert moved.max() <= 3 * 1.5 + step_deg, np.sort(moved)[-5:]
    assert np.median(moved) < 1.5


def test_viewers_write_pngs(refined, tmp_path):
    from pwem.viewers import FscViewer

    from prime_plugin.viewers import PrimeRefine3DViewer

    fsc_viewer = FscViewer(project=refined.getProject(), protocol=refined, figure=None)
    fsc_viewer.visualize(refined.outputFSC)
    fsc_viewer.plotter.savefig(tmp_path / "fsc.png")
    assert (tmp_path / "fsc.png").stat().st_size > 10_000

    viewer = PrimeRefine3DViewer(project=refined.getProject(), protocol=refined)
    viewer.setProtocol(refined)
    for name, show in viewer._getVisualizeDict().items():
        views = show()
        if name == "showVolume":
            assert views[0].getPath() == refined.outputVolume.getFileName()
            continue
        path = tmp_path / f"{name}.png"
        views[0].savefig(path)
        assert path.stat().st_size > 10_000, name


def test_summary_and_methods_report_the_resolution(refined):
    summary = " ".join(refined.summary())
    methods = " ".join(refined.methods())
    assert "Gold-standard resolution" in summary and " A" in summary
    assert "PRIME" in methods and "half-sets" in methods


def _wait_for(condition, timeout_s, what):
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


def test_resume_after_stop_continues_from_the_last_complete_iteration(project, imported, refined):
    """Stop a running refinement (Scipion kills the protocol and the engine), relaunch in resume
    mode: the conversion step is skipped, the engine continues from its checkpoint, and the
    result equals the uninterrupted run with the same seed (the ``refined`` fixture)."""
    from pyworkflow.protocol.constants import MODE_RESUME

    from prime_plugin.protocols import ProtPrimeRefine3D

    prot = new_refinement(project, imported, "prime refine, stopped")
    project.launchProtocol(prot, wait=False)
    log = prot._getExtraPath(ProtPrimeRefine3D.OUTDIR, "run.log")
    _wait_for(lambda: os.path.exists(log) and "iteration   2:" in open(log).read(), 300, "iteration 2")
    project.stopProtocol(prot)
    assert prot.isAborted()
    stopped_after = open(log).read().count(" iteration ")
    assert stopped_after < 8

    prot.runMode.set(MODE_RESUME)
    project.launchProtocol(prot, wait=True)
    assert prot.isFinished(), prot.getErrorMessage()
    text = open(log).read()
    assert "Continuing after iteration" in text
    resumed = open(prot.getStdoutLog()).read().rsplit("runMode:", 1)[1]
    assert "refineStep" in resumed and "convertInputStep" not in resumed
    ours = starfile.read(prot._getExtraPath(ProtPrimeRefine3D.OUTDIR, "run_data.star"))["particles"]
    uninterrupted = starfile.read(refined._getExtraPath(ProtPrimeRefine3D.OUTDIR, "run_data.star"))["particles"]
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    np.testing.assert_allclose(ours[angles].to_numpy(), uninterrupted[angles].to_numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def particles_without_ctf(project, imported):
    """The same images imported as plain files: no CTF, no alignment."""
    from pwem.protocols import ProtImportParticles

    prot = project.newProtocol(ProtImportParticles, objLabel="particles without CTF",
                               importFrom=ProtImportParticles.IMPORT_FROM_FILES,
                               filesPath=os.path.join(project.getPath(), "relion_data"), filesPattern="input.mrcs",
                               samplingRate=PIXEL)
    project.launchProtocol(prot, wait=True)
    assert prot.isFinished(), prot.getErrorMessage()
    return prot.outputParticles


def _import_volume(project, path, pixel_size, label):
    from pwem.protocols import ProtImportVolumes

    prot = project.newProtocol(ProtImportVolumes, objLabel=label, filesPath=str(path), samplingRate=pixel_size)
    project.launchProtocol(prot, wait=True)
    assert prot.isFinished(), prot.getErrorMessage()
    return prot.outputVolume


def _validation_errors(project, particles, volume, **form):
    from prime_plugin.protocols import ProtPrimeRefine3D

    prot = project.newProtocol(ProtPrimeRefine3D, **{"particleDiameter": 300, **form})
    prot.inputParticles.set(particles)
    prot.referenceVolume.set(volume)
    return " ".join(prot.validate())


def test_validation_names_the_problem(project, imported, particles_without_ctf, tmp_path):
    particles, volume_import, _, truth = imported
    good_particles, good_volume = particles.outputParticles, volume_import.outputVolume
    assert _validation_errors(project, good_particles, good_volume) == ""

    assert "no CTF estimates" in _validation_errors(project, particles_without_ctf, good_volume)
    assert _validation_errors(project, particles_without_ctf, good_volume, doCTF=False) == ""
    assert "no 3D" in _validation_errors(project, good_particles, good_volume, useInputAlignment=True)

    small = tmp_path / "small.mrc"
    with mrcfile.new(small) as mrc:
        mrc.set_data(np.ascontiguousarray(truth[:48, :48, :48]))
        mrc.voxel_size = PIXEL
    errors = _validation_errors(project, good_particles, _import_volume(project, small, PIXEL, "48 px map"))
    assert "48 px wide but the particles are 64 px" in errors
    errors = _validation_errors(project, good_particles,
                                _import_volume(project, os.path.join(project.getPath(), "relion_data", "truth.mrc"),
                                               4.0, "map at 4 A/px"))
    assert "4 A/px but the particles 5 A/px" in errors
    assert "larger than the box" in _validation_errors(project, good_particles, good_volume, particleDiameter=400)
    assert "At least one iteration" in _validation_errors(project, good_particles, good_volume, maxIterations=0)
    assert _validation_errors(project, good_particles, good_volume, maxIterations=1) == ""
    assert "Symmetry 'X3'" in _validation_errors(project, good_particles, good_volume, symmetryGroup="X3")
    assert "must be positive" in _validation_errors(project, good_particles, good_volume, weightSoftness=0.0)

    gone = tmp_path / "gone.mrc"
    with mrcfile.new(gone) as mrc:
        mrc.set_data(np.ascontiguousarray(truth))
        mrc.voxel_size = PIXEL
    from prime_plugin.convert import stack_path

    volume = _import_volume(project, gone, PIXEL, "map deleted later")
    os.remove(stack_path(volume.getFileName()))
    assert "Missing files" in _validation_errors(project, good_particles, volume)


def test_every_form_setting_reaches_the_engine(project, imported, tmp_path):
    """The command the protocol runs, parsed by the real ``prime`` parser, gives the engine the
    form's values: the defaults, and a form with every setting changed."""
    import shlex

    from pwem.objects import VolumeMask

    from prime_plugin.cli import build_parser
    from prime_plugin.cli.refine import parameters_from_args
    from prime_plugin.core.refine import RefineParameters
    from prime_plugin.protocols import ProtPrimeRefine3D

    particles, volume_import, _, _ = imported
    mask = tmp_path / "mask.mrc"
    with mrcfile.new(mask) as mrc:
        mrc.set_data(soft_sphere_mask(BOX, 28.0, 3.0).astype(np.float32))
        mrc.voxel_size = PIXEL
    defaults = RefineParameters("", "", "")

    changed = {"symmetryGroup": "D2", "initialLowPass": 30.0, "updateFraction": 0.5, "numberOfDirections": 500,
               "maxIterations": 7, "originRange": 3.0, "numberOfPeaks": 2, "weightSoftness": 0.05,
               "refineBetweenGridPoints": False, "randomSeed": 11, "numberOfThreads": 1, "particleDiameter": 250,
               "searchMode": 1, "noiseModel": False, "useInputAlignment": True, "localSigmaAngle": 2.0}
    for form in ({}, changed):
        prot = project.newProtocol(ProtPrimeRefine3D, **form)
        prot.inputParticles.set(particles.outputParticles)
        prot.referenceVolume.set(volume_import.outputVolume)
        if form:
            prot.solventMask.set(VolumeMask(location=str(mask)))
        argv = shlex.split(prot._refineArguments())
        engine = parameters_from_args(build_parser().parse_args(argv))
        expected = {"symmetry": form.get("symmetryGroup", "C1"), "ini_high_A": form.get("initialLowPass", 40.0),
                    "update_fraction": form.get("updateFraction", defaults.update_fraction),
                    "search_mode": ["greedy", "shc"][form.get("searchMode", 0)],
                    "noise_model": form.get("noiseModel", defaults.noise_model),
                    "n_space": form.get("numberOfDirections", 4000), "max_iter": form.get("maxIterations", 30),
                    "trs_px": form.get("originRange", defaults.trs_px), "n_peaks": form.get("numberOfPeaks", 3),
                    "sigma": form.get("weightSoftness", defaults.sigma),
                    "subgrid": form.get("refineBetweenGridPoints", True), "seed": form.get("randomSeed", 0),
                    "threads": form.get("numberOfThreads", 2),
                    "particle_diameter_A": form.get("particleDiameter", defaults.particle_diameter_A),
                    "solvent_mask": str(mask) if form else None, "local_sigma_deg": 2.0 if form else None}
        assert {name: getattr(engine, name) for name in expected} == expected
        assert engine.particles == prot._particlesStar() and Path(engine.reference).is_file()


def test_engine_failure_fails_the_run_with_its_reason(project, imported, tmp_path):
    """A broken input the form cannot see (a truncated stack) fails the run quickly with the
    engine's one-line reason as the protocol's error, never a hung run."""
    from pwem.protocols import ProtImportParticles

    from prime_plugin.convert import stack_path
    from prime_plugin.protocols import ProtPrimeRefine3D

    particles, volume_import, _, _ = imported
    broken = tmp_path / "broken"
    broken.mkdir()
    source = os.path.join(project.getPath(), "relion_data")
    for name in ("input.star", "input.mrcs"):
        shutil.copy(os.path.join(source, name), broken / name)
    prot_import = project.newProtocol(ProtImportParticles, objLabel="particles, stack truncated later",
                                      importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                      starFile=str(broken / "input.star"), magnification=10000, samplingRate=PIXEL,
                                      copyFiles=False)
    project.launchProtocol(prot_import, wait=True)
    assert prot_import.isFinished(), prot_import.getErrorMessage()
    stack = stack_path(prot_import.outputParticles.getFirstItem().getFileName())
    real = os.path.realpath(stack)
    with open(real, "r+b") as f:
        f.truncate(os.path.getsize(real) // 2)

    prot = project.newProtocol(ProtPrimeRefine3D, objLabel="prime refine, broken stack", particleDiameter=300,
                               updateFraction=1.0, maxIterations=2)
    prot.inputParticles.set(prot_import.outputParticles)
    prot.referenceVolume.set(volume_import.outputVolume)
    started = time.monotonic()
    project.launchProtocol(prot, wait=True)
    assert time.monotonic() - started < 120
    assert prot.isFailed()
    assert "prime refine: error:" in prot.getErrorMessage()
    assert "input.mrcs" in prot.getErrorMessage()


def test_workflow_template_runs_import_and_refinement(project, imported):
    """The shipped template, filled in as a user would, loads into the project and runs to the end."""
    import prime_plugin

    template = next(t for t in prime_plugin.Plugin().getTemplates() if t.name == "prime_refine")
    template.replaceEnvVariables()  # what Scipion does before showing the form
    template.parseContent()
    data_dir = os.path.join(project.getPath(), "relion_data")
    for alias, value in (("star", os.path.join(data_dir, "input.star")), ("map", os.path.join(data_dir, "truth.mrc")),
                         ("angpix", str(PIXEL)), ("map_angpix", str(PIXEL)), ("diameter", "300"), ("ini_high", "40"), ("threads", "2")):
        assert template.setParamValue(alias, value) >= 1, alias
    before = {p.getObjId() for p in project.getRuns()}
    project.loadProtocols(template.createTemplateFile())
    loaded = sorted((p for p in project.getRuns() if p.getObjId() not in before), key=lambda p: p.getObjId())
    assert [p.getClassName() for p in loaded] == ["ProtImportParticles", "ProtImportVolumes", "ProtPrimeRefine3D"]
    refine = loaded[-1]
    refine.maxIterations.set(10)  # keep the test short; the template's own default is 30
    for prot in loaded:
        project.launchProtocol(prot, wait=True)
        assert prot.isFinished(), f"{prot.getClassName()}: {prot.getErrorMessage()}"
    output = refine.outputParticles
    assert len(output) == N_PARTICLES and output.hasAlignmentProj()
