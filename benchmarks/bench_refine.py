"""Benchmark: ``prime refine`` against RELION 3.1 auto-refine on relion_project data with known poses.

Data (made once into the cache folder, which is also the project folder every command
runs in): the shared 70S ribosome map cropped to 64^3 (``v[:64, :64, :64]``, 5 A/px);
5,000 particles projected by ``relion_project --ctf`` at uniformly random orientations,
origins uniform in a disc of 4 px, astigmatic defocus (U 1-3 um, V = U x 0.9-1.0, random
angle), 300 kV, Cs 2.7 mm, amplitude contrast 0.1; white Gaussian noise at SNR 0.05 (the
mean variance of the clean CTF-modulated projections over the whole box divided by the
noise variance). ``input.star`` (RELION 3.1: optics, image names, defocus,
rlnRandomSubset alternating 1/2, no angles, no origins) is the input of both programs;
``truth.star`` adds the true angles and origins. ``start.mrc`` is the true map: both
programs low-pass it to 40 A themselves (--ini_high 40).

Runs (in the cache folder, each wrapped in GNU time -v; wall time is the whole command):

    prime refine --i input.star --ref start.mrc --o prime_frac0.1 --particle_diameter 300 --update_frac 0.1 --j 2
    prime refine --i input.star --ref start.mrc --o prime_frac1.0 --particle_diameter 300 --update_frac 1.0 --max_iter 15 --j 2
    prime refine --i input.star --ref start.mrc --o prime_frac0.1_grid --particle_diameter 300 --update_frac 0.1 --no_subgrid --j 2
        (orientations left on the search grid: what the sub-grid refinement gains)
    mpirun --allow-run-as-root --oversubscribe -np 3 relion_refine_mpi --auto_refine ... --o Refine3D/run --sym C1
        (RELION_ARGS: the issue's command; --oversubscribe because Open MPI refuses 3 ranks on 2 cores)
    relion_reconstruct --i truth.star --o true_half{1,2}.mrc --ctf --subset {1,2}   (the bound: true poses)

For peak memory each MPI rank runs under its own GNU time (``sh -c "/usr/bin/time ...
relion_refine_mpi ..."``, the RELION arguments unchanged) and the three peaks are summed.
RELION is stopped after --relion_limit_min minutes (default 60); its last complete
iteration is then scored. The 1-minute load average is sampled every 10 s during each run.

Scores, computed here from the written files: median angle between the true and the found
rotation (C1), median origin error; gold-standard resolution at FSC 0.143 between the two
written half maps, unmasked and with soft_sphere_mask(64, 30, 4); the combined map against
the true map at FSC 0.5; the same per iteration (run_itNNN_*), timed from the start of the
command by run.log's time stamps (prime) or the files' modification times (RELION).

Incremental learning: the wall time at which each prime run first reaches the common final
resolution (the worse of the two final gold-standard resolutions + 0.2 A) in its per-iteration
half maps, and their ratio (batch / fractional); and, to explain it, the cost of an iteration
fitted from run.log (a fixed part plus a part per particle searched).

    python benchmarks/bench_refine.py --cache /tmp/bench_refine [--rerun NAME ...] [--relion_limit_min 60]

Runs whose timing record exists in the cache are not run again (unless named by --rerun:
prime_frac0.1, prime_frac1.0, prime_frac0.1_grid, relion, bound). Prints the table and writes (or replaces) this
benchmark's section of benchmarks/RESULTS.md; the convergence figure goes to
CACHE/refine_convergence.png.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
from scipy.spatial.transform import Rotation

from bench_common import REPO, prime_executable, run_checked, timed_run, update_results
from prime_plugin.core.fourier import fsc, resolution_at, soft_sphere_mask
from prime_plugin.core.geometry import euler_to_matrix, matrix_to_euler

SHARED = Path(os.environ.get("PRIME_SHARED_DATA", REPO.parent / "shared" / "data"))
N_PARTICLES, BOX, APIX, SNR, MAX_SHIFT_PX, SEED = 5000, 64, 5.0, 0.05, 4.0, 2024
MASK = (BOX, 30.0, 4.0)
SECTION = "## prime refine vs RELION 3.1 auto-refine"
NYQUIST_A = 2 * APIX
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGINS = ["rlnOriginXAngst", "rlnOriginYAngst"]

PRIME_RUNS = {
    "prime_frac0.1": ["refine", "--i", "input.star", "--ref", "start.mrc", "--o", "prime_frac0.1",
                      "--particle_diameter", "300", "--update_frac", "0.1", "--j", "2"],
    "prime_frac1.0": ["refine", "--i", "input.star", "--ref", "start.mrc", "--o", "prime_frac1.0",
                      "--particle_diameter", "300", "--update_frac", "1.0", "--max_iter", "15", "--j", "2"],
    "prime_frac0.1_grid": ["refine", "--i", "input.star", "--ref", "start.mrc", "--o", "prime_frac0.1_grid",
                           "--particle_diameter", "300", "--update_frac", "0.1", "--no_subgrid", "--j", "2"],
}
RELION_ARGS = ["--auto_refine", "--split_random_halves", "--ctf", "--firstiter_cc", "--ini_high", "40",
               "--particle_diameter", "300", "--healpix_order", "2", "--auto_local_healpix_order", "4",
               "--offset_range", "5", "--offset_step", "2", "--flatten_solvent", "--zero_mask", "--norm", "--scale",
               "--pad", "2", "--low_resol_join_halves", "40", "--dont_combine_weights_via_disc", "--pool", "30",
               "--j", "1", "--i", "input.star", "--ref", "start.mrc", "--o", "Refine3D/run", "--sym", "C1"]
RELION_RANKS = 3
# Open MPI refuses 3 ranks on 2 cores without --oversubscribe (RELION's master rank only coordinates).
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(RELION_RANKS)]


# ---------------------------------------------------------------- data

def write_map(path, volume):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = APIX


def optics_table():
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                         "rlnImagePixelSize": [APIX], "rlnImageSize": [BOX], "rlnImageDimensionality": [2],
                         "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})


def make_data(cache):
    """truth.mrc, start.mrc, input.star/.mrcs and truth.star in ``cache`` (skipped when present)."""
    if (cache / "truth.star").is_file():
        return
    cache.mkdir(parents=True, exist_ok=True)
    volume = np.ascontiguousarray(mrcfile.read(SHARED / "ribosome70S_65px.mrc")[:BOX, :BOX, :BOX], np.float32)
    write_map(cache / "truth.mrc", volume)
    write_map(cache / "start.mrc", volume)
    rng = np.random.default_rng(SEED)
    angles = np.stack(matrix_to_euler(Rotation.random(N_PARTICLES, random_state=SEED).as_matrix()), axis=1)
    radius = MAX_SHIFT_PX * np.sqrt(rng.uniform(0, 1, N_PARTICLES))
    phase = rng.uniform(0, 2 * np.pi, N_PARTICLES)
    defocus_u = rng.uniform(10000, 30000, N_PARTICLES)
    poses = pd.DataFrame({"rlnImageName": [f"{i + 1}@dummy.mrcs" for i in range(N_PARTICLES)],
                          "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
                          "rlnOriginXAngst": radius * np.cos(phase) * APIX,
                          "rlnOriginYAngst": radius * np.sin(phase) * APIX,
                          "rlnDefocusU": defocus_u, "rlnDefocusV": defocus_u * rng.uniform(0.9, 1.0, N_PARTICLES),
                          "rlnDefocusAngle": rng.uniform(0, 180, N_PARTICLES), "rlnOpticsGroup": 1})
    starfile.write({"optics": optics_table(), "particles": poses}, cache / "poses.star", float_format="%.8f")
    run_checked(["relion_project", "--i", "truth.mrc", "--o", "clean", "--ang", "poses.star", "--angpix", str(APIX),
                 "--ctf"], cache)
    written = starfile.read(cache / "poses.star")["particles"]  # the truth as RELION read it
    clean = mrcfile.read(cache / "clean.mrcs").astype(np.float32)
    sigma = np.sqrt(clean.var(axis=(1, 2)).mean() / SNR)
    noisy = clean + (sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    with mrcfile.new(cache / "input.mrcs", overwrite=True) as mrc:
        mrc.set_data(noisy)
        mrc.voxel_size = APIX
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@input.mrcs" for i in range(N_PARTICLES)],
                              "rlnOpticsGroup": 1, "rlnRandomSubset": np.arange(N_PARTICLES) % 2 + 1,
                              "rlnDefocusU": written["rlnDefocusU"], "rlnDefocusV": written["rlnDefocusV"],
                              "rlnDefocusAngle": written["rlnDefocusAngle"]})
    starfile.write({"optics": optics_table(), "particles": particles}, cache / "input.star", float_format="%.8f")
    for column in ANGLES + ORIGINS:
        particles[column] = written[column].to_numpy()
    starfile.write({"optics": optics_table(), "particles": particles}, cache / "truth.star", float_format="%.8f")
    (cache / "clean.mrcs").unlink()


# ---------------------------------------------------------------- timed runs

def run_all(cache, rerun, relion_limit_min):
    records = {}
    for name, args in PRIME_RUNS.items():
        if name in rerun or not (cache / f"timing_{name}.json").is_file():
            shutil.rmtree(cache / name, ignore_errors=True)
            records[name] = timed_run(name, [prime_executable(), *args], "prime " + " ".join(args), cache)
    if "relion" in rerun or not (cache / "timing_relion.json").is_file():
        shutil.rmtree(cache / "Refine3D", ignore_errors=True)
        (cache / "Refine3D").mkdir()
        per_rank = ("exec /usr/bin/time -f %M -o rss_relion_rank_$OMPI_COMM_WORLD_RANK relion_refine_mpi "
                    + " ".join(RELION_ARGS))
        shown = " ".join(MPIRUN) + " relion_refine_mpi " + " ".join(RELION_ARGS)
        records["relion"] = timed_run("relion", [*MPIRUN, "sh", "-c", per_rank], shown, cache,
                                      limit_s=60 * relion_limit_min)
    if "bound" in rerun or not (cache / "timing_bound.json").is_file():
        for subset in ("1", "2"):
            run_checked(["relion_reconstruct", "--i", "truth.star", "--o", f"true_half{subset}.mrc", "--ctf",
                         "--subset", subset], cache)
        run_checked(["relion_reconstruct", "--i", "truth.star", "--o", "true_full.mrc", "--ctf"], cache)
        (cache / "timing_bound.json").write_text(json.dumps({"name": "bound"}))
    return {name: json.loads((cache / f"timing_{name}.json").read_text())
            for name in (*PRIME_RUNS, "relion")}


# ---------------------------------------------------------------- scores

def image_key(name):
    index, stack = str(name).split("@", 1)
    return int(index), Path(stack).name


def poses(star):
    table = starfile.read(star)
    particles = table["particles"] if isinstance(table, dict) else table
    keyed = particles.set_index(particles["rlnImageName"].map(image_key))
    return keyed[ANGLES].to_numpy(np.float64), keyed[ORIGINS].to_numpy(np.float64) / APIX, keyed.index


def pose_errors(truth_star, found_star):
    """Angles (deg) between the true and the found rotations and origin errors (px), matched by image name."""
    true_angles, true_origins, keys = poses(truth_star)
    found_angles, found_origins, found_keys = poses(found_star)
    order = pd.Index(found_keys).get_indexer(keys)
    if (order < 0).any():
        raise ValueError(f"{found_star}: {(order < 0).sum()} particles of the truth missing")
    a, b = euler_to_matrix(*true_angles.T), euler_to_matrix(*found_angles[order].T)
    cosine = (np.trace(np.einsum("nij,nkj->nik", a, b), axis1=1, axis2=2) - 1) / 2
    angles = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    return angles, np.linalg.norm(found_origins[order] - true_origins, axis=1)


def half_map_resolutions(half1, half2):
    """Gold-standard resolution (A, FSC 0.143): masked with soft_sphere_mask(64, 30, 4), and unmasked."""
    v1, v2 = mrcfile.read(half1), mrcfile.read(half2)
    mask = soft_sphere_mask(*MASK)
    return (float(resolution_at(fsc(v1 * mask, v2 * mask), 0.143, BOX, APIX)),
            float(resolution_at(fsc(v1, v2), 0.143, BOX, APIX)))


def truth_resolution(path, truth):
    return float(resolution_at(fsc(mrcfile.read(path), truth), 0.5, BOX, APIX))


def half_average(half1, half2):
    """The mean of two half maps: the map of a RELION iteration (stopped runs write no combined map)."""
    return 0.5 * (mrcfile.read(half1).astype(np.float64) + mrcfile.read(half2))


def prime_series(cache, name, record):
    """Per iteration: elapsed s since the command started (run.log time stamps), masked resolution,
    median angular error; and from run.log's line: the particles searched, whether it was their
    first (exhaustive) search, and the iteration's own seconds."""
    out = cache / name
    lines = {}
    for line in (out / "run.log").read_text().splitlines():
        found = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) iteration +(\d+):.*searched (\d+) particles.*"
                         r"median orientation change ([^,]+),.* ([\d.]+) s$", line)
        if found:
            moment = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            lines[int(found.group(2))] = {"elapsed_s": moment - record["started"], "searched": int(found.group(3)),
                                          "first_search": "first search" in found.group(4),
                                          "seconds": float(found.group(5))}
    series = []
    for iteration in sorted(lines):
        stem = out / f"run_it{iteration:03d}"
        masked, _ = half_map_resolutions(f"{stem}_half1_class001_unfil.mrc", f"{stem}_half2_class001_unfil.mrc")
        angles, _ = pose_errors(cache / "truth.star", f"{stem}_data.star")
        series.append({"iteration": iteration, **lines[iteration], "resolution_A": masked,
                       "median_error_deg": float(np.median(angles))})
    return series


def relion_series(cache, record):
    """Per RELION iteration: elapsed s, masked resolution of run_itNNN_half1/2_class001.mrc, median angular
    error and the files' stem. Iteration 1 is left out: RELION 3.1 writes practically identical half maps
    there (FSC > 0.96 to Nyquist), so its FSC says nothing.

    The run may be a chain of segments (:func:`relion_segments`): each continuation adds the
    iterations after the one it continued from, up to the one the next continuation starts from."""
    series = []
    folder = cache / "Refine3D"
    segments = relion_segments(cache, record)
    for index, segment in enumerate(segments):
        prefix, last = segment["prefix"], None
        if index + 1 < len(segments):
            last = segments[index + 1]["from_iteration"]
        offset = 0.0
        if index:
            previous = [p for p in series if p["iteration"] == segment["from_iteration"]]
            if not previous:
                raise SystemExit(f"{prefix} continues from iteration {segment['from_iteration']}, which the "
                                 f"segment before did not finish")
            offset = previous[0]["elapsed_s"]
        for data in sorted(folder.glob(f"{prefix}_it[0-9][0-9][0-9]_data.star")):
            iteration = int(data.name[len(prefix) + 3:len(prefix) + 6])
            if iteration <= segment["from_iteration"] or (last is not None and iteration > last):
                continue  # RELION rewrites the iteration it continues from; later ones belong to the next segment
            elapsed = offset + segment_seconds(segment, data.stat().st_mtime)
            point = _relion_point(cache, data, folder / f"{prefix}_it{iteration:03d}", iteration, elapsed)
            if point is not None:
                series.append(point)
    return series


def segment_seconds(segment, moment):
    """Seconds the segment ran from its start to ``moment`` (epoch s), its pauses left out."""
    paused = sum(max(0.0, min(end, moment) - begin) for begin, end in segment["pauses"] if begin < moment)
    return moment - segment["started"] - paused


def _relion_point(cache, data, stem, iteration, elapsed_s):
    half1, half2 = (Path(f"{stem}_half{h}_class001.mrc") for h in (1, 2))
    if iteration <= 1 or not (half1.is_file() and half2.is_file()):
        return None
    masked, _ = half_map_resolutions(half1, half2)
    angles, _ = pose_errors(cache / "truth.star", data)
    return {"iteration": iteration, "elapsed_s": elapsed_s, "resolution_A": masked,
            "median_error_deg": float(np.median(angles)), "stem": str(stem)}


def relion_segments(cache, record):
    """RELION's run as a chain of segments: the first command, then its continuations, if any.

    A run stopped before it converged is continued by hand with ``mpirun ... relion_refine_mpi
    --continue Refine3D/PREFIX_itK_optimiser.star --o Refine3D/run_ctK --dont_combine_weights_via_disc
    --pool 30 --j 1`` (the same MPI layout), from the last complete iteration K of the segment
    before; the continuations are listed in order in CACHE/relion_continuations.json, each a
    timed record with ``from_iteration`` K, ``started`` (epoch s), ``wall_s`` (its own running
    time, pauses left out), ``stopped``, the load figures, ``note`` and ``pauses``: the [begin,
    end] epoch seconds during which its processes were suspended (SIGSTOP / SIGCONT, to free the
    machine for other measurements). A segment's iteration is timed as the time to the iteration
    it continued from, plus its own running time to the iteration's files; the work of a segment
    after the iteration the next one continues from is not counted.
    """
    segments = [{"prefix": "run", "from_iteration": 0, "started": record["started"], "pauses": [],
                 "record": record}]
    path = cache / "relion_continuations.json"
    for continuation in (json.loads(path.read_text()) if path.is_file() else []):
        k = int(continuation["from_iteration"])
        segments.append({"prefix": f"run_ct{k}", "from_iteration": k, "started": continuation["started"],
                         "pauses": continuation.get("pauses", []), "record": continuation})
    return segments


def score(cache, records):
    truth = mrcfile.read(cache / "truth.mrc")
    rows = {}
    for name in PRIME_RUNS:
        out = cache / name
        angles, shifts = pose_errors(cache / "truth.star", out / "run_data.star")
        masked, unmasked = half_map_resolutions(out / "run_half1_class001_unfil.mrc", out / "run_half2_class001_unfil.mrc")
        log = (out / "run.log").read_text()
        converged = re.search(r"Converged at iteration (\d+)", log)
        series = prime_series(cache, name, records[name])
        rows[name] = {"angles": angles, "shifts": shifts, "masked": masked, "unmasked": unmasked,
                      "truth_05": truth_resolution(out / "run_class001.mrc", truth), "iterations": len(series),
                      "converged": int(converged.group(1)) if converged else None, "series": series,
                      "record": records[name]}
    record = records["relion"]
    series = relion_series(cache, record)
    final = cache / "Refine3D"
    segments = relion_segments(cache, record)
    last_segment = segments[-1]
    prefix = last_segment["prefix"]
    stdout_name = "relion.stdout" if len(segments) == 1 else f"relion_ct{last_segment['from_iteration']}.stdout"
    if len(segments) > 1:  # the whole chain; CPU, memory and load: the last segment's
        last = last_segment["record"]
        record = dict(record, stopped=last["stopped"], continued=True, segments=[x["record"] for x in segments[1:]],
                      user_s=last.get("user_s", float("nan")), sys_s=last.get("sys_s", float("nan")),
                      rss_mb=last.get("rss_mb", float("nan")), load_mean=last["load_mean"],
                      load_max=last["load_max"],
                      command=record["command"] + "".join(f"  (then: {x['record']['command']})" for x in segments[1:]))
        if last["stopped"]:  # compared at its last complete iteration, so timed to it
            record["wall_s"] = series[-1]["elapsed_s"]
        else:  # finished: the time to the iteration it continued from plus its own running time
            reached = {point["iteration"]: point["elapsed_s"] for point in series}
            record["wall_s"] = reached[last_segment["from_iteration"]] + last["wall_s"]
    if (final / f"{prefix}_half1_class001_unfil.mrc").is_file():
        halves = [final / f"{prefix}_half{h}_class001_unfil.mrc" for h in (1, 2)]
        data, combined = final / f"{prefix}_data.star", final / f"{prefix}_class001.mrc"
    else:  # stopped: the last complete iteration
        stem = series[-1]["stem"]
        halves = [Path(f"{stem}_half{h}_class001.mrc") for h in (1, 2)]
        data, combined = Path(f"{stem}_data.star"), None
    angles, shifts = pose_errors(cache / "truth.star", data)
    masked, unmasked = half_map_resolutions(*halves)
    stdout = (cache / stdout_name).read_text(errors="replace")
    rows["relion"] = {"angles": angles, "shifts": shifts, "masked": masked, "unmasked": unmasked,
                      "truth_05": (truth_resolution(combined, truth) if combined
                                   else float(resolution_at(fsc(half_average(*halves), truth), 0.5, BOX, APIX))),
                      "iterations": series[-1]["iteration"] if series else 0,
                      "converged": "has converged" in stdout, "series": series, "record": record}
    bound_masked, bound_unmasked = half_map_resolutions(cache / "true_half1.mrc", cache / "true_half2.mrc")
    rows["bound"] = {"masked": bound_masked, "unmasked": bound_unmasked,
                     "truth_05": truth_resolution(cache / "true_full.mrc", truth)}
    return rows


def first_reaching(series, target):
    return next((s["elapsed_s"] for s in series if s["resolution_A"] <= target), None)


def incremental(rows):
    """Wall time of each prime run to the common final resolution, and batch / fractional."""
    fractional, batch = rows["prime_frac0.1"], rows["prime_frac1.0"]
    target = max(fractional["masked"], batch["masked"]) + 0.2
    t_frac, t_batch = first_reaching(fractional["series"], target), first_reaching(batch["series"], target)
    last_target = max(fractional["series"][-1]["resolution_A"], batch["series"][-1]["resolution_A"]) + 0.2
    t_frac_last, t_batch_last = (first_reaching(fractional["series"], last_target),
                                 first_reaching(batch["series"], last_target))

    def ratio(a, b):
        return b / a if a and b else None

    return {"target_A": target, "t_frac": t_frac, "t_batch": t_batch, "ratio": ratio(t_frac, t_batch),
            "last_target_A": last_target, "t_frac_last": t_frac_last, "t_batch_last": t_batch_last,
            "ratio_last": ratio(t_frac_last, t_batch_last), **iteration_cost(fractional["series"], batch["series"]),
            "first_pass_iterations": {name: first_full_pass(rows[name]["series"], N_PARTICLES)
                                      for name in ("prime_frac0.1", "prime_frac1.0")},
            "batch_passes_to_target": next((s["iteration"] for s in batch["series"] if s["resolution_A"] <= target),
                                           None)}


def iteration_cost(fractional, batch):
    """Least-squares fit of an iteration's seconds = fixed + per_particle x particles searched, over the
    iterations of both prime runs that searched particles with known orientations (SHC); and each run's
    median cost per particle of the first (exhaustive) searches, the fixed cost taken off."""
    shc = [s for s in fractional + batch if not s["first_search"]]
    design = np.array([[1.0, s["searched"]] for s in shc])
    (fixed, per_particle), *_ = np.linalg.lstsq(design, np.array([s["seconds"] for s in shc]), rcond=None)

    def first_search_ms(series):
        costs = [(s["seconds"] - fixed) / s["searched"] for s in series if s["first_search"]]
        return 1e3 * float(np.median(costs)) if costs else float("nan")

    return {"fixed_s": float(fixed), "per_particle_ms": 1e3 * float(per_particle), "fit_points": len(shc),
            "first_search_ms": {"prime_frac0.1": first_search_ms(fractional), "prime_frac1.0": first_search_ms(batch)}}


def first_full_pass(series, n_particles):
    """The iteration by which every particle was searched once."""
    searched = np.cumsum([s["searched"] for s in series])
    return int(series[int(np.searchsorted(searched, n_particles))]["iteration"])


def matching_relion(rows):
    """Earliest elapsed time at which prime_frac0.1's iteration files were at least as good as RELION's final
    result on both median angular error and masked resolution."""
    relion = rows["relion"]
    goal_err, goal_res = float(np.median(relion["angles"])), relion["masked"]
    for s in rows["prime_frac0.1"]["series"]:
        if s["median_error_deg"] <= goal_err and s["resolution_A"] <= goal_res:
            return s
    return None


# ---------------------------------------------------------------- report

LABELS = {"prime_frac0.1": "prime --update_frac 0.1", "prime_frac1.0": "prime --update_frac 1.0 --max_iter 15",
          "prime_frac0.1_grid": "prime --update_frac 0.1 --no_subgrid",
          "relion": f"RELION 3.1 auto-refine (MPI -np {RELION_RANKS})"}


def fmt(value, spec=".1f"):
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def table(rows):
    lines = ["| run | wall (s) | CPU user+sys (s) | peak RSS (MB) | iterations | median angular error (deg) | "
             "median origin error (px) | gold-standard FSC 0.143 masked / unmasked (A) | map vs truth FSC 0.5 (A) | "
             "load during (mean / max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in LABELS.items():
        r = rows[name]
        rec = r["record"]
        if name == "relion":
            note = "converged" if r["converged"] else ("stopped before it converged" if rec["stopped"] else "not converged")
        else:
            note = f"converged at {r['converged']}" if r["converged"] else "max_iter reached"
        sampled = " (sampled)" if rec.get("figures_sampled") else ""
        lines.append(f"| {label} | {rec['wall_s']:.0f}{' (stopped)' if rec['stopped'] else ''} | "
                     f"{fmt(rec['user_s'] + rec['sys_s'], '.0f')}{sampled} | {fmt(rec['rss_mb'], '.0f')}{sampled} | "
                     f"{r['iterations']} ({note}) | {np.median(r['angles']):.2f} | {np.median(r['shifts']):.2f} | "
                     f"{r['masked']:.2f} / {r['unmasked']:.2f} | {fmt(r['truth_05'], '.2f')} | "
                     f"{rec['load_mean']:.2f} / {rec['load_max']:.2f} |")
    b = rows["bound"]
    lines.append(f"| bound: relion_reconstruct at the true poses | | | | | 0 | 0 | {b['masked']:.2f} / "
                 f"{b['unmasked']:.2f} | {b['truth_05']:.2f} | |")
    return "\n".join(lines)


def series_table(rows):
    lines = ["| run | iteration: elapsed s, masked resolution A, median angular error deg |", "|---|---|"]
    for name, label in LABELS.items():
        cells = "; ".join(f"{s['iteration']}: {s['elapsed_s']:.0f} s, {s['resolution_A']:.2f} A, "
                          f"{s['median_error_deg']:.1f} deg" for s in rows[name]["series"])
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def repeats(cache):
    """Every timed run recorded in the cache (the table shows the last of each)."""
    path = cache / "timing_history.jsonl"
    if not path.is_file():
        return ""
    lines = []
    for record in map(json.loads, path.read_text().splitlines()):
        when = datetime.datetime.fromtimestamp(record["started"]).strftime("%H:%M")
        figures = (f"wall {record['wall_s']:.0f} s" + (" (stopped at the limit)" if record.get("stopped") else "")
                   + (f", CPU {record['user_s'] + record['sys_s']:.0f} s, peak {record['rss_mb']:.0f} MB, load "
                      f"{record['load_mean']:.1f} / {record['load_max']:.1f}" if "load_mean" in record else ""))
        lines.append(f"- {record['name']} started {when}: {figures}" + (f"; {record['note']}" if "note" in record
                                                                         else ""))
    return "\n".join(lines)


def median_difference_interval(ours, theirs, resamples=2000, seed=0):
    """95% bootstrap interval of median(ours) - median(theirs) for per-particle errors of the same particles
    (resampled together)."""
    rng = np.random.default_rng(seed)
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    differences = np.empty(resamples)
    for k in range(resamples):
        pick = rng.integers(0, len(ours), len(ours))
        differences[k] = np.median(ours[pick]) - np.median(theirs[pick])
    return float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))


def goals(rows, inc, match):
    ours, theirs = rows["prime_frac0.1"], rows["relion"]
    err, their_err = float(np.median(ours["angles"])), float(np.median(theirs["angles"]))
    wall, their_wall = ours["record"]["wall_s"], theirs["record"]["wall_s"]
    nyquist_ok = ours["masked"] <= 1.15 * NYQUIST_A
    low, high = median_difference_interval(ours["angles"], theirs["angles"])
    same_error = err <= their_err or low <= 0.0  # lower, or not distinguishable from RELION's
    as_good = ours["masked"] <= theirs["masked"] and same_error
    lines = [
        f"- Median angular error <= 3 deg: {'holds' if err <= 3 else 'does not hold'} ({err:.2f} deg; RELION "
        f"{their_err:.2f} deg).",
        f"- Gold-standard resolution within 15% of Nyquist ({1.15 * NYQUIST_A:.1f} A) or at least RELION's "
        f"({theirs['masked']:.2f} A): {'holds' if nyquist_ok or ours['masked'] <= theirs['masked'] else 'does not hold'}"
        f" ({ours['masked']:.2f} A masked, {ours['unmasked']:.2f} A unmasked; bound at the true poses "
        f"{rows['bound']['masked']:.2f} A).",
        f"- Same or better resolution and angular error than RELION: {'holds' if as_good else 'does not hold'} "
        f"({ours['masked']:.2f} vs {theirs['masked']:.2f} A masked, {err:.3f} vs {their_err:.3f} deg; the difference "
        f"of the median errors, ours - RELION's, has the 95% interval [{low:+.3f}, {high:+.3f}] deg (bootstrap over "
        f"the particles, paired): {'lower' if high < 0 else 'not distinguishable' if low <= 0 else 'higher'}).",
        f"- In at most 1/10 of RELION's wall time: {'holds' if wall <= their_wall / 10 else 'does not hold'} "
        f"(whole command {wall:.0f} s vs {their_wall:.0f} s: {their_wall / wall:.1f}x faster; the goal needs "
        f"<= {their_wall / 10:.0f} s, {'met' if wall <= their_wall / 10 else f'missed by {wall / (their_wall / 10):.1f}x'}).",
    ]
    if theirs["record"]["stopped"]:
        lines.append(f"- RELION was stopped before it converged, after {theirs['iterations']} complete iterations: its wall "
                     f"time is a lower bound and its accuracy that of its last complete iteration, not its final one.")
    if match:
        lines.append(f"- The first iteration of prime --update_frac 0.1 at least as good as RELION's final result on "
                     f"both figures: iteration {match['iteration']}, {match['elapsed_s']:.0f} s after the start "
                     f"({their_wall / match['elapsed_s']:.1f}x less than RELION's whole run).")
    else:
        lines.append("- No iteration of prime --update_frac 0.1 was at least as good as RELION's final result on both "
                     "figures.")
    return "\n".join(lines)


def incremental_text(inc):
    def t(value):
        return "not reached" if value is None else f"{value:.0f} s"

    text = (f"Common final resolution: the worse of the two final gold-standard resolutions + 0.2 A = "
            f"{inc['target_A']:.2f} A (masked). First reached in the per-iteration half maps at {t(inc['t_frac'])} "
            f"(--update_frac 0.1) and {t(inc['t_batch'])} (--update_frac 1.0)")
    text += f": ratio {inc['ratio']:.1f}x" if inc["ratio"] else ": no ratio"
    text += (f". With the worse of the two last-iteration resolutions + 0.2 A = {inc['last_target_A']:.2f} A instead: "
             f"{t(inc['t_frac_last'])} and {t(inc['t_batch_last'])}")
    text += f", ratio {inc['ratio_last']:.1f}x." if inc["ratio_last"] else "."
    text += " The seed reports 8.6x for delta = 0.1 (5,000 256^2 beta-galactosidase images)."
    first = inc["first_pass_iterations"]
    text += (f"\n\nWhy the ratio is small here (figures from the runs' run.log): an iteration costs "
             f"{inc['fixed_s']:.2f} s + {inc['per_particle_ms']:.2f} ms per particle searched by stochastic hill "
             f"climbing (least squares over the {inc['fit_points']} such iterations of both runs); a particle's "
             f"first search is exhaustive (the input has no angles): {inc['first_search_ms']['prime_frac1.0']:.1f} ms "
             f"per particle in the batch run, {inc['first_search_ms']['prime_frac0.1']:.1f} ms (median) in the "
             f"fractional one, whose later first searches align to higher frequencies. From this start (the true "
             f"map at 40 A) the batch run reaches the common resolution after {inc['batch_passes_to_target']} passes "
             f"over the data; --update_frac 0.1 needs {first['prime_frac0.1']} iterations just to search every "
             f"particle once, paying the exhaustive first search for all of them and the fixed cost "
             f"{first['prime_frac0.1']} times. Incremental learning can only pay where batch refinement needs many "
             f"passes; here it needs {inc['batch_passes_to_target']}.")
    return text


def convergence_figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for name, label in LABELS.items():
        series = rows[name]["series"]
        minutes = [s["elapsed_s"] / 60 for s in series]
        axes[0].plot(minutes, [s["resolution_A"] for s in series], "o-", ms=3, label=label)
        axes[1].plot(minutes, [s["median_error_deg"] for s in series], "o-", ms=3, label=label)
    axes[0].axhline(rows["bound"]["masked"], color="grey", ls="--", lw=0.8, label="true poses (bound)")
    axes[0].set_ylabel("gold-standard FSC 0.143, masked (A)")
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("median angular error (deg)")
    axes[1].set_xlabel("wall time since the command started (min)")
    fig.suptitle(f"{N_PARTICLES} ribosome particles, {BOX} px, {APIX} A/px, SNR {SNR}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def relion_timeline(relion):
    record = relion["record"]
    if not record.get("continued"):
        return ""
    times = {p["iteration"]: p["elapsed_s"] for p in relion["series"]}
    parts = [f"RELION's run in {len(record['segments']) + 1} segments (see relion_segments in the script): the first "
             f"command was stopped at the 60 min limit"]
    for segment in record["segments"]:
        k = segment["from_iteration"]
        paused = sum(end - begin for begin, end in segment.get("pauses", []))
        parts.append(f"`{segment['command']}` went on from iteration {k} (reached at {times.get(k, float('nan')):.0f} s)"
                     f" and ran {segment['wall_s']:.0f} s" + (f" (plus {paused:.0f} s suspended, not counted)"
                                                              if paused else "")
                     + f", 1-minute load {segment['load_mean']:.1f} mean / {segment['load_max']:.1f} max"
                     + (f": {segment['note']}" if segment.get("note") else ""))
    if record["stopped"]:
        ending = (f". Its wall time above is the time to its last complete iteration ({relion['iterations']}), "
                  f"whose scores are the ones given.")
    else:
        ending = (". The last segment converged; RELION's wall time above is the time to the iteration that segment "
                  "continued from plus the segment's own running time to its final files.")
    return "; then ".join(parts) + ending


def relion_memory_note(record):
    ranks = record.get("rss_ranks_mb")
    if ranks:
        return (f"For RELION the peak memory is the sum of the {RELION_RANKS} ranks' peaks "
                f"({', '.join(f'{m:.0f}' for m in ranks)} MB).")
    return ("RELION's CPU time and peak memory were not recorded: GNU time on mpirun sees neither the ranks' CPU "
            "nor their memory, and the continuations were started by hand without it (n/a in the table).")


def section(rows, inc, match, command_line, cache):
    records = [rows[name]["record"] for name in LABELS]
    cmds = "\n".join(f"    {r['command']}" for r in records)
    gits = sorted({r["git"] for r in records})
    return f"""{SECTION}

Command: `{command_line}` (run from the repository root; each run is skipped when its record is in the
cache), {datetime.date.today().isoformat()}, {os.cpu_count()} cores (shared). Code: {', '.join(gits)}.
1-minute load average sampled every 10 s during each run (a run on 2 threads alone gives ~2).
Data: {N_PARTICLES} particles, box {BOX}, {APIX} A/px, SNR {SNR}, CTF 1-3 um astigmatic, origins up to
{MAX_SHIFT_PX:g} px, made by relion_project from the ribosome map cropped to 64^3 (see the script's docstring);
the true map is the start for both programs (--ini_high 40). Commands (in the cache folder):

{cmds}
    relion_reconstruct --i truth.star --o true_half1.mrc --ctf --subset 1   (and --subset 2; the bound)

{relion_memory_note(rows['relion']['record'])} Scores are computed by the benchmark from the
written files (mask: soft_sphere_mask(64, 30, 4); map vs truth unmasked; for a stopped RELION run, the
mean of its last two half maps).

{table(rows)}

Per iteration (elapsed wall time since the command started; RELION's from its files' times):

{series_table(rows)}

All timed runs in this cache (the table shows the last of each):

{repeats(cache)}

{relion_timeline(rows['relion'])}

Incremental learning: {incremental_text(inc)}

Goals (prime --update_frac 0.1 against RELION):

{goals(rows, inc, match)}

Figure (not committed): {cache / 'refine_convergence.png'}, resolution and median angular error against
wall time for every run.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, type=Path, help="data and run folder (data made once)")
    parser.add_argument("--rerun", nargs="*", default=[], choices=[*PRIME_RUNS, "relion", "bound"],
                        help="runs to repeat although their records are in the cache")
    parser.add_argument("--relion_limit_min", type=float, default=60.0, help="stop RELION after this many minutes")
    parser.add_argument("--no_results", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    make_data(cache)
    records = run_all(cache, set(args.rerun), args.relion_limit_min)
    rows = score(cache, records)
    inc, match = incremental(rows), matching_relion(rows)
    convergence_figure(rows, cache / "refine_convergence.png")
    command_line = "python benchmarks/bench_refine.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = section(rows, inc, match, command_line, cache)
    print(text)
    if not args.no_results:
        update_results(SECTION, text)


if __name__ == "__main__":
    main()
