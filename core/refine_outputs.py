"""Refinement outputs in the layout of RELION's Refine3D job, plus PRIME's own tables and plots.

Per iteration: run_itNNN_data.star, run_itNNN_half{1,2}_class001_unfil.mrc,
run_itNNN_model.star. At the end: run_data.star (every input column kept, the
refined ones replaced), run_half{1,2}_class001_unfil.mrc, run_class001.mrc (both
halves, FSC-weighted), run_model.star (FSC table), run_posterior.star (the n_peaks
orientations of every particle with their weights, which RELION does not give),
run_convergence.star (the per-iteration figures of run.log as a table), fsc.png, angdist.png, convergence.png. Every file is written atomically;
a map of NaN or zeros is never written (the run stops with PrimeRunError).

Columns added to run_data.star beyond RELION's: rlnPrimeCorrelation, the
normalised (noise-weighted) polar correlation of the best orientation (-1..1), and
rlnPrimeContrast, the particle's contrast scale against its reference at that orientation
(least squares; the particle is inserted with weight proportional to its square, so that
particles of little contrast, junk among them, weigh little).
"""

import numpy as np
import pandas as pd

from prime_plugin.core.mrc import write_volume
from prime_plugin.core.star import ParticleTable, write_particles, write_star_blocks
from prime_plugin.core.validation import check_result_map


def particle_table(setup, state):
    """The input particle table with the refined orientations, origins, half-sets and weights."""
    particles = setup.table.particles.copy()
    particles["rlnImageName"] = setup.image_names
    apix = setup.pixel_size_A
    angles = np.nan_to_num(state.angles_deg)
    particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"] = angles.T
    particles["rlnOriginXAngst"] = state.shift_px[:, 0] * apix
    particles["rlnOriginYAngst"] = state.shift_px[:, 1] * apix
    particles["rlnRandomSubset"] = state.half
    particles["rlnClassNumber"] = 1
    particles["rlnMaxValueProbDistribution"] = state.peak_weights.max(axis=1)
    particles["rlnNrOfSignificantSamples"] = (state.peak_weights > 0.01).sum(axis=1)
    particles["rlnPrimeCorrelation"] = state.correlation
    particles["rlnPrimeContrast"] = state.scale
    return ParticleTable(particles, setup.table.optics, setup.table.other_blocks, setup.table.source)


def model_blocks(curve, resolution_A, setup):
    """RELION-style model STAR blocks: general figures and the gold-standard FSC per shell."""
    box, apix = setup.box, setup.pixel_size_A
    shells = np.arange(len(curve))
    frequency = shells / (box * apix)
    clipped = np.clip(curve, 0.0, 0.999)
    general = {"rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": box,
               "rlnCurrentResolution": 1.0 / resolution_A, "rlnCurrentImageSize": box, "rlnPixelSize": apix,
               "rlnNrClasses": 1, "rlnTau2FudgeFactor": 1.0}
    classes = pd.DataFrame({"rlnReferenceImage": ["run_class001.mrc"], "rlnClassDistribution": [1.0],
                            "rlnAccuracyRotations": [setup.angular_step_deg],
                            "rlnEstimatedResolution": [resolution_A]})
    fsc_table = pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": frequency,
                              "rlnAngstromResolution": np.where(shells > 0, 1.0 / np.maximum(frequency, 1e-12), 999.0),
                              "rlnSsnrMap": 2 * clipped / (1 - clipped), "rlnGoldStandardFsc": curve})
    return {"model_general": general, "model_classes": classes, "model_class_1": fsc_table}


def write_iteration(out, state, setup, maps, curve):
    """The per-iteration files run_itNNN_* (maps, data, model)."""
    from prime_plugin.core.fourier import resolution_at

    for h, volume in enumerate(maps, start=1):
        check_result_map(volume, f"half map {h} of iteration {state.iteration}")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"run_it{state.iteration:03d}"
    for h, volume in enumerate(maps, start=1):
        write_volume(f"{stem}_half{h}_class001_unfil.mrc", volume, setup.pixel_size_A)
    write_particles(particle_table(setup, state), f"{stem}_data.star")
    resolution = resolution_at(curve, 0.143, setup.box, setup.pixel_size_A)
    write_star_blocks(model_blocks(curve, resolution, setup), f"{stem}_model.star")


def posterior_table(setup, state):
    """One row per kept orientation of every particle: rank, angles, origin, weight, correlation."""
    n, n_peaks = state.peak_weights.shape
    particle = np.repeat(np.arange(n), n_peaks)
    rank = np.tile(np.arange(1, n_peaks + 1), n)
    keep = state.peak_weights.ravel() > 0
    angles = state.peak_angles_deg.reshape(-1, 3)[keep]
    rows = particle[keep]
    apix = setup.pixel_size_A
    return pd.DataFrame({
        "rlnImageName": np.asarray(setup.image_names, dtype=object)[rows],
        "rlnPrimePeakRank": rank[keep], "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1],
        "rlnAnglePsi": angles[:, 2], "rlnOriginXAngst": state.shift_px[rows, 0] * apix,
        "rlnOriginYAngst": state.shift_px[rows, 1] * apix, "rlnPrimePeakWeight": state.peak_weights.ravel()[keep],
        "rlnPrimeCorrelation": state.peak_correlations.ravel()[keep]})


def write_final(out, result, params):
    """The final Refine3D-style outputs, the posterior table and the report plots."""
    from prime_plugin.core import report

    setup, state = result.setup, result.state
    apix = setup.pixel_size_A
    for h, volume in enumerate(result.half_maps, start=1):
        check_result_map(volume, f"the final half map {h}")
    check_result_map(result.volume, "the final map")
    for h, volume in enumerate(result.half_maps, start=1):
        write_volume(out / f"run_half{h}_class001_unfil.mrc", volume, apix)
    write_volume(out / "run_class001.mrc", result.volume, apix)
    write_particles(particle_table(setup, state), out / "run_data.star")
    write_star_blocks(model_blocks(result.fsc, result.resolution_A, setup), out / "run_model.star")
    write_star_blocks({"posterior": posterior_table(setup, state)}, out / "run_posterior.star")
    write_star_blocks({"convergence": pd.DataFrame(state.history)}, out / "run_convergence.star")
    report.fsc_plot(out / "fsc.png", result.fsc, setup.box, apix)
    report.angular_distribution_plot(out / "angdist.png", np.nan_to_num(state.angles_deg), setup.symmetry_ops)
    report.convergence_plot(out / "convergence.png", state.history)
