"""Benchmark (issue 19): ``prime refine`` and RELION 3.1 auto-refine at a realistic size, box 256.

Data (made once into the cache folder, which is the project folder every command runs in;
a cache already holding truth.mrc, particles.mrcs, particles.star and input.star is used as
it is, whoever made it):

- ``truth.mrc``: the 5A1A beta-galactosidase model's density (tools/make_demo_map.py's
  ``model_map``: D2 axes on x, y, z, centre at voxel box // 2) in a 256 px box at 1.0 A/px,
  gemmi's d_min 2.0 A;
- ``particles.mrcs`` / ``particles.star`` (the true poses): 5,000 images simulated from it,

      prime simulate --map truth.mrc --n 5000 --o . --snr 0.05 --defocus 0.8 2.5 --sym D2 --shift_px 4 --seed 1 --j 2

  (uniform views written in D2's asymmetric unit, origins uniform in a disc of 4 px, defocus
  0.8-2.5 um, SNR 0.05 over the whole box);
- ``input.star``: particles.star without the rlnAngle* and rlnOrigin* columns, with
  rlnRandomSubset alternating 1, 2: the input of both programs. Both start from truth.mrc and
  low-pass it to 30 A themselves (--ini_high 30).

--n and --box make a smaller set into another cache for trying the script (the field of view
stays 256 A: the pixel size becomes 256 / box A); RESULTS.md is written only for the full set.

Runs (in the cache folder, each wrapped in GNU time -v by bench_common.timed_run and skipped
when its record CACHE/timing_NAME.json exists, unless named by --rerun):

    prime:          prime refine --i input.star --ref truth.mrc --o prime_run --sym D2 --particle_diameter 200
                        --ini_high 30 --j 2
    prime_frac0.1:  the same with --o prime_frac0.1 --update_frac 0.1   (prime's default is 0.2)
    prime_frac1.0:  the same with --o prime_frac1.0 --update_frac 1.0   (classic batch refinement)
    relion:         mpirun --allow-run-as-root --oversubscribe -np 3 relion_refine_mpi --auto_refine ... --sym D2
                    (bench_real.py's RELION command with --ini_high 30, --i input.star, --ref truth.mrc;
                    each rank under its own GNU time, their peaks summed)

By default ``prime`` and ``relion`` run; the incremental-learning runs each take long and run
only when named (--runs). RELION is stopped after --relion_limit_min minutes of running time
(default 120) and scored at its last complete iteration; --suspend / --resume pause it (the
pauses are left out of its times, as in bench_real.py). Its scores are kept in
benchmarks/bench_large_relion.json when RESULTS.md is written, and used when the cache holds no
RELION run (--rerun relion runs it anew). A prime output folder made by hand has
no timing record: --adopt NAME TIME_FILE records it from its GNU time -v report (its start is
the report's modification time minus its wall time; no load figures); --score DIR [--time_file
F] only prints a finished folder's scores. An output folder without a record is never removed:
adopt it or --rerun it.

Scores, computed here from each program's written files in the same way (per iteration too;
an FSC of two 256^3 maps takes seconds, so they are kept in CACHE/scores.json by file and
modification time):
- wall time, CPU time (user + system) and peak resident memory (MB) of the whole command;
- gold-standard resolution (A): FSC 0.143 between the half maps, unmasked and under a soft
  sphere of 220 A diameter (1 inside 204 A, a raised-cosine edge falling to 0 at 220 A);
- the map (RELION's stopped run: the mean of its half maps) against truth.mrc under the same
  sphere, at FSC 0.5 and 0.143 (A);
- angular error against the true poses (matched by image name): the angle of the rotation
  between the true and the found one, the smallest over the D2 mates (no frame search: the truth
  is known); median and 90th percentile (deg), fraction within 2 deg; median origin error (px);
- prime, per iteration: run.log's time stamp (from the command's start), the iteration's own
  seconds, the working box and alignment limit ("alignment to K Fourier px at box M");
- RELION, per iteration: its files' modification times (pauses left out), the HEALPix order it
  searched at (run_itNNN_sampling.star, _rlnHealpixOrder: the sampling the iteration used, as
  relion_refine_mpi updates it at the start of an iteration's expectation; local searches from
  --auto_local_healpix_order on) and the image size it aligned at (_rlnCurrentImageSize of the
  iteration before's model STAR file); the mean seconds per iteration at each sampling.

Incremental learning: for the prime runs present (--update_frac 0.1, 0.2, 1.0), the wall time
at which each first reaches a common resolution, and the ratios frac1.0 / frac0.1 and frac1.0 /
frac0.2 (the seed reports 8.6x and 4.7x on this setting). prime makes its per-iteration half maps
at the iteration's working box (they cannot pass its Nyquist) and the final ones at full size, so
two targets: the worst of the runs' final gold-standard resolutions + 0.2 A, the final maps
counting at the run's wall time; and the worst of their last iterations' + 0.2 A, in the
per-iteration half maps only (the refinement's own progress).

    python benchmarks/bench_large.py --cache /work/bench_large [--runs NAME ...] [--rerun NAME ...] [--no_results]
    python benchmarks/bench_large.py --cache /work/bench_large --adopt prime /work/bench_large/prime_run.time
    python benchmarks/bench_large.py --cache /work/bench_large --score DIR [--time_file F]
    python benchmarks/bench_large.py --cache /work/bench_large --suspend | --resume     (RELION's run)
    python benchmarks/bench_large.py --cache /tmp/bl_small --n 200 --box 128 --runs prime --no_results

Prints the tables and writes (or replaces) this benchmark's section of benchmarks/RESULTS.md.
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
from bench_common import (REPO, add_relion_pause_arguments, git_state, gnu_time, prime_executable, run_checked,
                          suspend_run, timed_relion_run, timed_run, update_results)
from bench_real import elapsed_without_pauses, fmt, image_key
from prime_plugin.core.fourier import fsc, resolution_at, soft_sphere_mask
from prime_plugin.core.geometry import euler_to_matrix, rotation_angles_deg
from prime_plugin.core.symmetry import symmetry_operators

SHARED = Path(os.environ.get("PRIME_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL = SHARED / "models" / "5a1a.cif.gz"
FULL_BOX, FULL_N, FIELD_OF_VIEW_A = 256, 5000, 256.0
SYMMETRY, DIAMETER_A, INI_HIGH_A = "D2", 200, 30
MASK_INNER_DIAMETER_A, MASK_DIAMETER_A = 204.0, 220.0
WITHIN_DEG = 2.0
SECTION = "## Realistic sizes: box 256, 5,000 particles (issue 19)"
RELION_RECORD = REPO / "benchmarks" / "bench_large_relion.json"
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGINS = ["rlnOriginXAngst", "rlnOriginYAngst"]
SIMULATE_ARGS = ["--snr", "0.05", "--defocus", "0.8", "2.5", "--sym", SYMMETRY, "--shift_px", "4", "--seed", "1",
                 "--j", "2"]

# name: (output folder, extra arguments); "prime" is prime's default --update_frac 0.2.
PRIME_RUNS = {"prime": ("prime_run", []),
              "prime_frac0.1": ("prime_frac0.1", ["--update_frac", "0.1"]),
              "prime_frac1.0": ("prime_frac1.0", ["--update_frac", "1.0"])}
UPDATE_FRAC = {"prime_frac0.1": 0.1, "prime": 0.2, "prime_frac1.0": 1.0}
LABELS = {"prime": "prime (defaults: --update_frac 0.2)", "prime_frac0.1": "prime --update_frac 0.1",
          "prime_frac1.0": "prime --update_frac 1.0", "relion": "RELION 3.1 auto-refine (MPI -np 3)"}
AUTO_LOCAL_HEALPIX_ORDER = 4
RELION_ARGS = ["--auto_refine", "--split_random_halves", "--ctf", "--firstiter_cc", "--ini_high", str(INI_HIGH_A),
               "--particle_diameter", str(DIAMETER_A), "--healpix_order", "2", "--auto_local_healpix_order",
               str(AUTO_LOCAL_HEALPIX_ORDER), "--offset_range", "5", "--offset_step", "2", "--flatten_solvent",
               "--zero_mask", "--norm", "--scale", "--pad", "2", "--low_resol_join_halves", "40",
               "--dont_combine_weights_via_disc", "--pool", "30", "--j", "1", "--i", "input.star", "--ref",
               "truth.mrc", "--o", "Refine3D/run", "--sym", SYMMETRY]


def prime_args(name):
    folder, extra = PRIME_RUNS[name]
    return ["refine", "--i", "input.star", "--ref", "truth.mrc", "--o", folder, "--sym", SYMMETRY,
            "--particle_diameter", str(DIAMETER_A), "--ini_high", str(INI_HIGH_A), "--j", "2", *extra]


# ---------------------------------------------------------------- data

DATA_FILES = ("truth.mrc", "particles.mrcs", "particles.star", "input.star")


def make_data(cache, n_particles, box):
    """truth.mrc, particles.mrcs/.star and input.star in ``cache``; each step skipped when its file exists
    (a finished set is reused as it is, whoever made it)."""
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "truth.mrc").is_file():
        sys.path.insert(0, str(REPO / "tools"))
        from make_demo_map import model_map  # needs gemmi (pip install gemmi)

        pixel_A = FIELD_OF_VIEW_A / box
        print(f"making truth.mrc: 5A1A at {box} px, {pixel_A:g} A/px, d_min {2 * pixel_A:g} A", flush=True)
        with mrcfile.new(cache / "truth.mrc", overwrite=True) as mrc:
            mrc.set_data(model_map(MODEL, box, pixel_A, 2 * pixel_A))
            mrc.voxel_size = pixel_A
    if not (cache / "particles.star").is_file():
        print(f"simulating {n_particles} particles", flush=True)
        run_checked([prime_executable(), "simulate", "--map", "truth.mrc", "--n", n_particles, "--o", ".",
                     "--overwrite", *SIMULATE_ARGS], cache)
    if not (cache / "input.star").is_file():
        table = starfile.read(cache / "particles.star")
        particles = table["particles"].drop(columns=[c for c in table["particles"].columns
                                                     if c.startswith(("rlnAngle", "rlnOrigin"))])
        particles["rlnRandomSubset"] = np.arange(len(particles)) % 2 + 1
        starfile.write({"optics": table["optics"], "particles": particles}, cache / "input.star",
                       float_format="%.6f")


class Truth:
    """The data set of a cache: box (px), pixel size (A), the true map, the score mask and the true poses."""

    def __init__(self, cache):
        missing = [name for name in DATA_FILES if not (cache / name).is_file()]
        if missing:
            raise SystemExit(f"{cache}: no data set ({', '.join(missing)} missing)")
        with mrcfile.open(cache / "truth.mrc", permissive=True) as mrc:
            self.map = np.asarray(mrc.data, np.float64)
            self.pixel_A = float(mrc.voxel_size.x)
        self.box = self.map.shape[0]
        edge_px = (MASK_DIAMETER_A - MASK_INNER_DIAMETER_A) / 2 / self.pixel_A
        self.mask = soft_sphere_mask(self.box, MASK_INNER_DIAMETER_A / 2 / self.pixel_A, edge_px)
        self.rotations, self.origins_px, self.keys = read_poses(cache / "particles.star", self.pixel_A)
        self.n_particles = len(self.keys)
        self.mates = symmetry_operators(SYMMETRY)

    @property
    def is_full_set(self):
        return self.box == FULL_BOX and self.n_particles == FULL_N

    def describe(self):
        return f"{self.n_particles} particles, box {self.box}, {self.pixel_A:g} A/px"


def read_poses(star, pixel_A):
    """Rotation matrices (n, 3, 3), origins (n, 2) px and image keys of a particle STAR file."""
    table = starfile.read(star)
    particles = table["particles"] if isinstance(table, dict) else table
    angles = particles[ANGLES].to_numpy(np.float64)
    return (euler_to_matrix(*angles.T), particles[ORIGINS].to_numpy(np.float64) / pixel_A,
            pd.Index(particles["rlnImageName"].map(image_key)))


# ---------------------------------------------------------------- scores

class ScoreMemo:
    """Scores of written files, kept in CACHE/scores.json under the files' names and modification times."""

    def __init__(self, cache):
        self.path = cache / "scores.json"
        self.table = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, files, compute):
        key = "|".join(f"{Path(f)}@{Path(f).stat().st_mtime_ns}" for f in files)
        if key not in self.table:
            self.table[key] = compute()
            self.path.write_text(json.dumps(self.table, indent=0))
        return self.table[key]


def map_scores(truth, memo, half1, half2, combined=None):
    """Gold-standard resolution masked / unmasked (A, FSC 0.143) and the map (the mean of the halves when
    ``combined`` is None) against the truth under the mask at FSC 0.5 and 0.143 (A)."""
    def compute():
        v1, v2 = mrcfile.read(half1).astype(np.float64), mrcfile.read(half2).astype(np.float64)
        volume = mrcfile.read(combined).astype(np.float64) if combined else 0.5 * (v1 + v2)
        mask, box, pixel_A = truth.mask, truth.box, truth.pixel_A
        versus_truth = fsc(volume * mask, truth.map * mask)
        return {"gold_standard_A": float(resolution_at(fsc(v1 * mask, v2 * mask), 0.143, box, pixel_A)),
                "gold_standard_unmasked_A": float(resolution_at(fsc(v1, v2), 0.143, box, pixel_A)),
                "truth_05_A": float(resolution_at(versus_truth, 0.5, box, pixel_A)),
                "truth_0143_A": float(resolution_at(versus_truth, 0.143, box, pixel_A))}

    return memo.get([half1, half2] + ([combined] if combined else []), compute)


def pose_scores(truth, memo, data_star):
    """Angular error (deg, the smallest over the D2 mates) and origin error (px) against the true poses."""
    def compute():
        rotations, origins_px, keys = read_poses(data_star, truth.pixel_A)
        order = keys.get_indexer(truth.keys)
        if (order < 0).any():
            raise SystemExit(f"{data_star}: {(order < 0).sum()} of the particles missing")
        errors = rotation_angles_deg(truth.rotations, rotations[order], truth.mates)
        return {"median_error_deg": float(np.median(errors)), "p90_error_deg": float(np.percentile(errors, 90)),
                "within_2deg": float(np.mean(errors <= WITHIN_DEG)),
                "median_origin_error_px": float(np.median(np.linalg.norm(origins_px[order] - truth.origins_px,
                                                                          axis=1)))}

    return memo.get([data_star], compute)


ITERATION_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) iteration +(\d+):(.*?)([\d.]+) s$")


def prime_log(folder):
    """run.log's iterations: {iteration: {moment (epoch s), seconds, searched, alignment_px, working_box}}; the
    last two None when the log does not say them."""
    iterations = {}
    for line in (folder / "run.log").read_text().splitlines():
        found = ITERATION_LINE.match(line)
        if not found:
            continue
        text = found.group(3)
        size = re.search(r"alignment to (\d+) Fourier px at box (\d+)", text)
        searched = re.search(r"searched (\d+) particles", text)
        iterations[int(found.group(2))] = {
            "moment": datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").timestamp(),
            "seconds": float(found.group(4)), "searched": int(searched.group(1)) if searched else None,
            "alignment_px": int(size.group(1)) if size else None, "working_box": int(size.group(2)) if size else None}
    return iterations


def prime_series(truth, memo, folder, started):
    """Per iteration of a prime run: run.log's figures, elapsed s since ``started`` (epoch s), scores."""
    series = []
    for iteration, logged in sorted(prime_log(folder).items()):
        stem = folder / f"run_it{iteration:03d}"
        if not Path(f"{stem}_data.star").is_file():
            continue
        point = {"iteration": iteration, "elapsed_s": logged.pop("moment") - started if started else float("nan"),
                 **logged}
        point.update(map_scores(truth, memo, f"{stem}_half1_class001_unfil.mrc", f"{stem}_half2_class001_unfil.mrc"))
        point.update(pose_scores(truth, memo, f"{stem}_data.star"))
        series.append(point)
    return series


def score_prime(truth, memo, folder, record=None):
    """A finished prime output folder's scores, final and per iteration (``record``: its timing record)."""
    folder = Path(folder)
    if not (folder / "run_class001.mrc").is_file():
        raise SystemExit(f"{folder}: no run_class001.mrc (not finished)")
    row = {"record": record, "series": prime_series(truth, memo, folder, record["started"] if record else None)}
    row.update(map_scores(truth, memo, folder / "run_half1_class001_unfil.mrc", folder / "run_half2_class001_unfil.mrc",
                          folder / "run_class001.mrc"))
    row.update(pose_scores(truth, memo, folder / "run_data.star"))
    converged = re.search(r"Converged at iteration (\d+)", (folder / "run.log").read_text())
    row["iterations"] = len(row["series"])
    row["converged"] = int(converged.group(1)) if converged else None
    return row


def star_value(path, label):
    """The value of ``label`` in a RELION key-value STAR block (a string), or None."""
    if not Path(path).is_file():
        return None
    found = re.search(rf"^{re.escape(label)}\s+(\S+)", Path(path).read_text(), re.MULTILINE)
    return found.group(1) if found else None


def relion_series(truth, memo, cache, record):
    """Per RELION iteration (from 1): elapsed s (its data STAR file's time, pauses left out) and the
    iteration's own seconds, HEALPix order, image size, and the scores (map scores from 2: RELION 3.1's
    first half maps are practically identical)."""
    folder = cache / "Refine3D"
    series, previous_s = [], None
    for data in sorted(folder.glob("run_it[0-9][0-9][0-9]_data.star")):
        iteration = int(data.name[6:9])
        stem = folder / f"run_it{iteration:03d}"
        elapsed = elapsed_without_pauses(data.stat().st_mtime, record["started"], record.get("pauses", []))
        if iteration >= 1:
            order = star_value(f"{stem}_sampling.star", "_rlnHealpixOrder")
            size = star_value(folder / f"run_it{iteration - 1:03d}_half1_model.star", "_rlnCurrentImageSize")
            point = {"iteration": iteration, "elapsed_s": elapsed,
                     "seconds": elapsed - previous_s if previous_s is not None else float("nan"),
                     "healpix_order": int(order) if order is not None else None,
                     "image_size": int(size) if size and int(size) > 0 else None}
            halves = [Path(f"{stem}_half{h}_class001.mrc") for h in (1, 2)]
            if iteration >= 2 and all(h.is_file() for h in halves):
                point.update(map_scores(truth, memo, *halves))
            point.update(pose_scores(truth, memo, data))
            series.append(point)
        previous_s = elapsed
    return series


def score_relion(truth, memo, cache):
    """RELION's scores from its files in the cache (its final files, or its last complete iteration when it
    was stopped), or the committed record when the cache holds no run of the full set."""
    timing = cache / "timing_relion.json"
    if not timing.is_file():
        return json.loads(RELION_RECORD.read_text()) if truth.is_full_set and RELION_RECORD.is_file() else None
    record = json.loads(timing.read_text())
    folder = cache / "Refine3D"
    series = relion_series(truth, memo, cache, record)
    if (folder / "run_half1_class001_unfil.mrc").is_file():
        row = map_scores(truth, memo, folder / "run_half1_class001_unfil.mrc", folder / "run_half2_class001_unfil.mrc",
                         folder / "run_class001.mrc")
        row.update(pose_scores(truth, memo, folder / "run_data.star"))
    else:  # stopped: its last complete iteration, timed to it
        scored = [point for point in series if "gold_standard_A" in point]
        if not scored:
            return None
        last = scored[-1]
        row = {key: last[key] for key in ("gold_standard_A", "gold_standard_unmasked_A", "truth_05_A", "truth_0143_A",
                                          "median_error_deg", "p90_error_deg", "within_2deg",
                                          "median_origin_error_px")}
        record = dict(record, ran_s=record["wall_s"], wall_s=last["elapsed_s"])
    stdout = (cache / "relion.stdout").read_text(errors="replace")
    row.update({"record": record, "series": series, "iterations": series[-1]["iteration"] if series else 0,
                "converged": "has converged" in stdout, "scored": datetime.date.today().isoformat()})
    return row


def per_sampling(series):
    """RELION's iterations grouped by HEALPix order: {order: (iterations, mean seconds per iteration)}."""
    groups = {}
    for point in series:
        if point["healpix_order"] is not None and np.isfinite(point["seconds"]):
            groups.setdefault(point["healpix_order"], []).append(point["seconds"])
    return {order: (len(seconds), float(np.mean(seconds))) for order, seconds in sorted(groups.items())}


# ---------------------------------------------------------------- records of runs made by hand

def gnu_time_wall_s(path):
    """The wall time (s) of a GNU time -v report ("Elapsed (wall clock) time (h:mm:ss or m:ss): ...")."""
    found = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", path.read_text(errors="replace"))
    if not found:
        raise SystemExit(f"{path}: no GNU time -v report (has the run finished?)")
    seconds = 0.0
    for part in found.group(1).split(":"):
        seconds = 60 * seconds + float(part)
    return seconds


def adopt(cache, name, time_file):
    """CACHE/timing_NAME.json for a prime run made by hand in its output folder under ``/usr/bin/time -v``
    (report in ``time_file``): started = the report's modification time (the command's end) minus its wall
    time; no load figures."""
    folder = cache / PRIME_RUNS[name][0]
    if not (folder / "run_class001.mrc").is_file():
        raise SystemExit(f"{folder}: no run_class001.mrc (not finished)")
    time_file = Path(time_file).resolve()
    wall_s = gnu_time_wall_s(time_file)
    status = re.search(r"Exit status: (\d+)", time_file.read_text(errors="replace"))
    first = (folder / "run.log").read_text().splitlines()[0]
    record = {"name": name, "command": first[20:] if re.match(r"\d{4}-\d\d-\d\d ", first) else first,
              "started": time_file.stat().st_mtime - wall_s, "wall_s": wall_s, "paused_s": 0.0, "pauses": [],
              "returncode": int(status.group(1)) if status else None, "stopped": False,
              "load_before": None, "load_mean": None, "load_max": None, **gnu_time(time_file),
              "git": git_state() + " (at adoption)", "adopted_from": str(time_file)}
    (cache / f"timing_{name}.json").write_text(json.dumps(record, indent=1))
    print(f"recorded {name}: wall {wall_s:.0f} s, peak {record['rss_mb']:.0f} MB, from {time_file}")


# ---------------------------------------------------------------- runs

def run_prime(cache, name, rerun):
    """The prime run ``name`` unless its record exists (or ``rerun``); a folder without a record is kept."""
    folder = cache / PRIME_RUNS[name][0]
    if (cache / f"timing_{name}.json").is_file() and not rerun:
        return
    if folder.exists() and not rerun:
        raise SystemExit(f"{folder} exists without a timing record: record it with --adopt {name} TIME_FILE (a GNU "
                         f"time -v report), or remake it with --rerun {name}")
    shutil.rmtree(folder, ignore_errors=True)
    args = prime_args(name)
    timed_run(name, [prime_executable(), *args], "prime " + " ".join(args), cache)


def run_relion(cache, rerun, limit_min, truth):
    """RELION's run unless its record is in the cache or committed (full set only), or ``rerun``."""
    recorded = (cache / "timing_relion.json").is_file() or (truth.is_full_set and RELION_RECORD.is_file())
    if recorded and not rerun:
        return
    timed_relion_run(cache, RELION_ARGS, limit_min)


# ---------------------------------------------------------------- incremental learning

def first_reaching(points, target_A):
    """Elapsed s of the first point whose gold-standard resolution is at least ``target_A``, or None."""
    return next((p["elapsed_s"] for p in points if p.get("gold_standard_A", np.inf) <= target_A), None)


def common_resolution_times(rows, names, target_A, with_final_maps):
    """When each run first reaches ``target_A`` (s), and the batch run's time over each fractional run's.

    The per-iteration half maps are reconstructed at the iteration's working box (so they cannot pass
    its Nyquist); ``with_final_maps`` adds the run's final full-size maps as a last point at its wall time."""
    reached = {}
    for name in names:
        points = list(rows[name]["series"])
        if with_final_maps:
            points.append({"elapsed_s": rows[name]["record"]["wall_s"],
                           "gold_standard_A": rows[name]["gold_standard_A"]})
        reached[name] = first_reaching(points, target_A)
    batch = reached.get("prime_frac1.0")
    ratios = {name: batch / reached[name] for name in ("prime_frac0.1", "prime") if batch and reached.get(name)}
    return {"target_A": target_A, "reached_s": reached, "ratios": ratios}


def incremental(rows):
    """For the prime runs present (two at least, else None), the time to a common resolution and the ratios
    batch / fractional: to the worst final gold-standard resolution + 0.2 A (final maps included), and to the
    worst last-iteration one + 0.2 A (per-iteration maps only: the refinement's own progress)."""
    names = [name for name in UPDATE_FRAC if name in rows]
    if len(names) < 2:
        return None
    final_A = max(rows[name]["gold_standard_A"] for name in names) + 0.2
    last_iteration_A = max(rows[name]["series"][-1]["gold_standard_A"] for name in names) + 0.2
    return {"final": common_resolution_times(rows, names, final_A, with_final_maps=True),
            "last_iteration": common_resolution_times(rows, names, last_iteration_A, with_final_maps=False)}


def incremental_text(inc):
    if inc is None:
        return "needs at least two of the runs prime_frac0.1, prime, prime_frac1.0 (run them with --runs)."

    def figures(times):
        reached = "; ".join(f"--update_frac {UPDATE_FRAC[name]:g}: "
                            + ("not reached" if seconds is None else f"{seconds:.0f} s")
                            for name, seconds in times["reached_s"].items())
        ratios = "; ".join(f"frac1.0 / frac{UPDATE_FRAC[name]:g} {ratio:.1f}x"
                           for name, ratio in times["ratios"].items())
        return f"{times['target_A']:.2f} A, reached at {reached} (ratios: {ratios or 'n/a'})"

    return (f"time to the worst final gold-standard resolution + 0.2 A = {figures(inc['final'])}; the final maps "
            f"count at the run's wall time, since the per-iteration half maps are made at the working box and cannot "
            f"pass its Nyquist. Time to the worst last-iteration resolution + 0.2 A (per-iteration half maps only) = "
            f"{figures(inc['last_iteration'])}. The seed reports 8.6x (0.1) and 4.7x (0.2) on this setting.")


# ---------------------------------------------------------------- report

def table(rows):
    lines = [("| run | wall (s) | CPU (s) | peak RSS (MB) | iterations "
              "| gold-standard FSC 0.143, masked / unmasked (A) "
              "| map vs truth, FSC 0.5 / 0.143 (A) | angular error: median / 90th pct (deg) | within 2 deg "
              "| median origin error (px) | load during (mean / max) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        rec = r["record"]
        if name == "relion":
            note = "converged" if r["converged"] else ("stopped" if rec.get("stopped") else "not converged")
            wall = f"{rec['wall_s']:.0f}" + (f" (to its last complete iteration; ran {rec['ran_s']:.0f})"
                                             if "ran_s" in rec else "")
        else:
            note = f"converged at {r['converged']}" if r["converged"] else "max_iter reached"
            wall = f"{rec['wall_s']:.0f}"
        sampled = " (sampled)" if rec.get("figures_sampled") else ""
        cpu = (rec.get("user_s") or float("nan")) + (rec.get("sys_s") or 0.0)
        lines.append(f"| {LABELS[name]} | {wall} | {fmt(cpu, '.0f')}{sampled} | "
                     f"{fmt(rec.get('rss_mb'), '.0f')}{sampled} | {r['iterations']} ({note}) | "
                     f"{r['gold_standard_A']:.2f} / {r['gold_standard_unmasked_A']:.2f} | "
                     f"{r['truth_05_A']:.2f} / {r['truth_0143_A']:.2f} | {r['median_error_deg']:.2f} / "
                     f"{r['p90_error_deg']:.2f} | {100 * r['within_2deg']:.0f}% | {r['median_origin_error_px']:.2f} | "
                     f"{fmt(rec.get('load_mean'))} / {fmt(rec.get('load_max'))} |")
    return "\n".join(lines)


def prime_series_table(series):
    lines = [("| iteration | elapsed (s) | seconds | working box (alignment limit, Fourier px) | searched | "
             "gold-standard (A) | vs truth FSC 0.5 (A) | median angular error (deg) | within 2 deg |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for s in series:
        box = f"{s['working_box']} ({s['alignment_px']})" if s["working_box"] else "n/a"
        lines.append(f"| {s['iteration']} | {fmt(s['elapsed_s'], '.0f')} | {s['seconds']:.1f} | {box} | "
                     f"{fmt(s['searched'], 'd')} | {s['gold_standard_A']:.2f} | {s['truth_05_A']:.2f} | "
                     f"{s['median_error_deg']:.2f} | {100 * s['within_2deg']:.0f}% |")
    return "\n".join(lines)


def sampling_step(healpix_order):
    """RELION's angular step at a HEALPix order (60 deg / 2^order), and whether it searches locally there."""
    local = ", local" if healpix_order >= AUTO_LOCAL_HEALPIX_ORDER else ""
    return f"{60 / 2 ** healpix_order:g} deg{local}"


def relion_series_table(series):
    lines = [("| iteration | elapsed (s) | seconds | HEALPix order (step) | image size (px) | gold-standard (A) | "
             "vs truth FSC 0.5 (A) | median angular error (deg) | within 2 deg |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for s in series:
        order = s["healpix_order"]
        sampling = "n/a" if order is None else f"{order} ({sampling_step(order)})"
        lines.append(f"| {s['iteration']} | {s['elapsed_s']:.0f} | {fmt(s['seconds'], '.0f')} | {sampling} | "
                     f"{fmt(s['image_size'], 'd')} | {fmt(s.get('gold_standard_A'))} | {fmt(s.get('truth_05_A'))} | "
                     f"{s['median_error_deg']:.2f} | {100 * s['within_2deg']:.0f}% |")
    return "\n".join(lines)


def sampling_text(series):
    groups = per_sampling(series)
    if not groups:
        return "no complete iteration yet."
    return "; ".join(f"HEALPix order {order} ({sampling_step(order)}): {mean:.0f} s over {count} "
                     f"iteration{'s' if count > 1 else ''}" for order, (count, mean) in groups.items()) + "."


def relion_memory_note(record):
    ranks = record.get("rss_ranks_mb")
    if ranks:
        return f"RELION's peak memory is the sum of its 3 ranks' peaks ({', '.join(f'{m:.0f}' for m in ranks)} MB)."
    if record.get("figures_sampled"):
        return ("RELION was stopped, so its ranks wrote no GNU time report: its CPU and peak memory are those "
                "sampled every 2 s over its process tree (the ranks' resident sets summed).")
    return ""


def report(rows, truth, command_line):
    inc = incremental(rows)
    records = [row["record"] for row in rows.values()]
    commands = "\n".join(f"    {rec['command']}" for rec in records)
    memory_note = " " + relion_memory_note(rows["relion"]["record"]) if "relion" in rows else ""
    adopted = [f"{name} (recorded from {row['record']['adopted_from']})" for name, row in rows.items()
               if row["record"].get("adopted_from")]
    parts = [f"""{SECTION}

Command: `{command_line}` (run from the repository root; runs whose record is in the cache are not run again),
{datetime.date.today().isoformat()}, {os.cpu_count()} cores (shared; the 1-minute load is sampled during each run:
a run on 2 threads alone gives ~2). Code: {', '.join(sorted({str(rec.get('git', '?')) for rec in records}))}.
Data ({truth.describe()}): 5A1A beta-galactosidase density at d_min {2 * truth.pixel_A:g} A (D2), simulated by
`prime simulate --map truth.mrc --n {truth.n_particles} --o . {' '.join(SIMULATE_ARGS)}`; input.star without the
poses; both programs start from the true map low-passed to {INI_HIGH_A} A (--ini_high). Commands (in the cache folder):

{commands}
""" + (f"\nMade by hand and recorded from GNU time reports (no load figures): {'; '.join(adopted)}.\n"
       if adopted else ""),
             f"""Scores from the written files (see the script's docstring): soft sphere of {MASK_DIAMETER_A:g} A
diameter for the FSCs, angular error against the true poses over the D2 mates.{memory_note}

{table(rows)}
"""]
    if "prime" in rows:
        parts.append(f"prime (defaults), per iteration (elapsed from the command's start by run.log's time stamps; "
                     f"seconds: run.log's own figure):\n\n{prime_series_table(rows['prime']['series'])}\n")
    if "relion" in rows:
        relion = rows["relion"]
        parts.append(f"RELION per iteration (elapsed: its data STAR file's time from the command's start, "
                     f"{relion['record'].get('paused_s', 0):.0f} s suspended left out; the image size is the one the "
                     f"iteration aligned at):\n\n{relion_series_table(relion['series'])}\n\n"
                     f"RELION's mean time per iteration at each angular sampling: {sampling_text(relion['series'])}\n")
    parts.append(f"Incremental learning: {incremental_text(inc)}\n")
    return "\n".join(parts)


def print_scores(name, row):
    record = row["record"]
    if record:
        print(f"{name}: wall {record['wall_s']:.0f} s, CPU {record['user_s'] + record['sys_s']:.0f} s, peak "
              f"{record['rss_mb']:.0f} MB")
    figures = ", ".join(f"{key} {fmt(value) if isinstance(value, float) else value}" for key, value in row.items()
                        if key not in ("series", "record"))
    print(f"{name}: {figures}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs = [*PRIME_RUNS, "relion"]
    parser.add_argument("--cache", required=True, type=Path, help="data and run folder (data made once)")
    parser.add_argument("--n", type=int, help=f"particles to simulate (default {FULL_N}; a new cache only)")
    parser.add_argument("--box", type=int,
                        help=f"box in px (default {FULL_BOX}; a new cache only; the pixel size is 256 A / box)")
    parser.add_argument("--runs", nargs="+", default=["prime", "relion"], choices=runs,
                        help="runs to make when their records are missing (default: prime relion)")
    parser.add_argument("--rerun", nargs="*", default=[], choices=runs, help="runs to make again although recorded")
    parser.add_argument("--relion_limit_min", type=float, default=120.0,
                        help="stop RELION after this many minutes of running time (pauses left out)")
    parser.add_argument("--no_results", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--adopt", nargs=2, metavar=("NAME", "TIME_FILE"),
                        help="record the finished prime run NAME made by hand under /usr/bin/time -v (its report)")
    parser.add_argument("--score", nargs="+", type=Path, metavar="DIR", help="only print these prime folders' scores")
    parser.add_argument("--time_file", type=Path, help="with --score: the folder's GNU time -v report")
    add_relion_pause_arguments(parser)
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    if args.suspend or args.resume:
        suspend_run(cache, "relion", resume=args.resume)
        return
    if args.adopt and args.adopt[0] not in PRIME_RUNS:
        parser.error(f"--adopt: NAME must be one of {', '.join(PRIME_RUNS)}")
    make_data(cache, args.n or FULL_N, args.box or FULL_BOX)
    truth, memo = Truth(cache), ScoreMemo(cache)
    if (args.n and args.n != truth.n_particles) or (args.box and args.box != truth.box):
        sys.exit(f"{cache} holds another data set ({truth.describe()}): choose another --cache")
    if args.score:
        for folder in args.score:
            record = None
            if args.time_file:
                wall_s = gnu_time_wall_s(args.time_file)
                record = {"wall_s": wall_s, "started": args.time_file.stat().st_mtime - wall_s,
                          **gnu_time(args.time_file)}
            row = score_prime(truth, memo, folder.resolve(), record)
            print_scores(str(folder), row)
            print(prime_series_table(row["series"]))
        return
    if args.adopt:
        adopt(cache, args.adopt[0], args.adopt[1])
    rerun = set(args.rerun)
    for name in dict.fromkeys([*args.runs, *args.rerun]):
        if name == "relion":
            run_relion(cache, "relion" in rerun, args.relion_limit_min, truth)
        else:
            run_prime(cache, name, name in rerun)
    rows = {}
    for name in PRIME_RUNS:
        timing = cache / f"timing_{name}.json"
        if timing.is_file():
            rows[name] = score_prime(truth, memo, cache / PRIME_RUNS[name][0], json.loads(timing.read_text()))
    relion = score_relion(truth, memo, cache)
    if relion is not None:
        rows["relion"] = relion
    elif (cache / "timing_relion.json").is_file():
        print("RELION's run left no iteration with half maps to score (iteration 2 at least).")
    if not rows:
        sys.exit("no run recorded in the cache yet")
    command_line = "python benchmarks/bench_large.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = report(rows, truth, command_line)
    print(text)
    if args.no_results:
        return
    if not truth.is_full_set:
        print(f"RESULTS.md left alone: {truth.describe()} is not the benchmark's set (box {FULL_BOX}, {FULL_N}).")
        return
    update_results(SECTION, text)
    if relion is not None and (cache / "timing_relion.json").is_file():
        RELION_RECORD.write_text(json.dumps(relion, indent=1) + "\n")


if __name__ == "__main__":
    main()
