"""Benchmark: ``prime refine`` in this process vs on a Dask LocalCluster, memory against particle count,
scheduler overhead, and a scaling model for 1,000,000 particles of box 256 on 100 nodes.

Data (made once into the cache folder, which is also the folder every command runs in): the shared
70S ribosome map cropped to 64^3 (``v[:64, :64, :64]``) and written with 5 A/px as ``ref.mrc`` (the
shared file has no pixel size in its header); it is the starting map of every refinement (prime
low-passes it to 40 A itself, --ini_high 40). Particles by ``prime simulate`` (uniform orientations,
origins uniform in a disc of 4 px, CTF with defocus 1-3 um, SNR 0.1):

    prime simulate --map ref.mrc --n 100000 --o sim100k --snr 0.1 --shift_px 4 --defocus 1 3 --seed 11 --j 2
    prime simulate --map ref.mrc --n 3000 --o sim3k --snr 0.1 --shift_px 4 --defocus 1 3 --seed 7 --j 2
    prime simulate --map ref.mrc --n 300 --o sim128 --rescale_angpix 2.5 --snr 0.1 --shift_px 4 --defocus 1 3 --seed 13 --j 2

sim100k/particles_10000.star and particles_50000.star are the first 10,000 and 50,000 rows of the
100k set (same stack); sim3k/particles_1000.star the first 1,000 rows of the 3k set.

1. Same result (sim3k, 3,000 particles): the same refinement twice, in this process and on 2 local
   Dask workers (1 thread each), 4 iterations with half the particles searched per iteration (every
   particle searched twice: exhaustively, then by hill climbing):

       prime refine --i sim3k/particles.star --ref ref.mrc --o same_inprocess --update_frac 0.5 --max_iter 4 --seed 3 --j 2
       prime refine --i sim3k/particles.star --ref ref.mrc --o same_local2 --update_frac 0.5 --max_iter 4 --seed 3 --j 2 --cluster local:2

   Scores: the angle between the two final rotations of every particle (run_data.star,
   prime_plugin.core.geometry.euler_to_matrix), the fraction within the engine's direction step for
   --nspace 2000 (directions_for_count); the FSC between the two run_class001.mrc and its minimum up to
   2/3 Nyquist.

2. Peak memory against particle count (10k, 50k, 100k of box 64): one iteration searching 10% of the
   particles, then the final insertion of every particle. ``prime refine --update_frac 0.1 --max_iter 1``
   is refused by the command line (--max_iter x --update_frac must reach 1), so the benchmark runs the
   same command line entry point (prime_plugin.cli.main) in a process whose argument check is given
   max_iter = 10 instead (REFINE_ONE_ITERATION below; nothing else changes); the run does 1 iteration.

       python -c REFINE_ONE_ITERATION refine --i sim100k/particles_N.star --ref ref.mrc --o mem_inprocess_N --update_frac 0.1 --max_iter 1 --seed 3 --j 2
       python -c REFINE_ONE_ITERATION refine ... --o mem_local2_N ... --cluster local:2
       prime reconstruct --i sim100k/particles_N.star --o rec_N.mrc --ctf --j 2

   Every command runs under GNU time -v; the resident set (and its anonymous part, RSS minus
   file-backed and shared pages) of every process of its tree is sampled every 0.5 s with psutil.
   The client (the prime process, which also hosts the LocalCluster's scheduler and nannies) and each
   Dask worker process are reported separately. MB per extra 1,000 particles: least-squares slope.

3. Scheduler overhead (sim3k/particles_1000.star): 4 iterations of 250 particles (2 chunks of 125,
   one per half), in this process and on local:2, 3 repetitions interleaved:

       prime refine --i sim3k/particles_1000.star --ref ref.mrc --o ovh_inprocess_R --update_frac 0.25 --max_iter 4 --seed 3 --j 2
       prime refine ... --o ovh_local2_R ... --cluster local:2

   Per-iteration wall times from run.log (the engine's own figure, search + sums + maps + FSC); the
   overhead estimate is the difference of the medians over the 3 x 4 iterations. Separately, the
   backend alone: DaskBackend.map_reduce on 2 local workers with tasks that do nothing but return a
   partial sum of the real size (box 64: FourierSums of 12.8 MB) and a shared object of the real
   references' size, the same number of chunks as an iteration (median of 5 calls).

4. Scaling model (1,000,000 particles, box 256, 100 nodes): the per-particle search + insertion cost is
   measured at box 128 (2.5 A/px, alignment to 32 Fourier px, --ini_high 10) on 300 particles:

       prime refine --i sim128/particles.star --ref ref.mrc --o cost128 --update_frac 1 --max_iter 2 --ini_high 10 --seed 3 --j 2

   (iteration 1: exhaustive first searches; iteration 2: hill climbing), scaled to box 256; the
   driver's per-iteration work (adding two partial sums, reconstruction, FSC, the polar references of
   both half maps) is timed here at box 256; array sizes come from the engine's own shapes.

    python benchmarks/bench_scale.py --cache /tmp/bench_scale [--rerun NAME ...] [--no_results]

Runs whose record exists in the cache are not run again (unless named by --rerun: same, memory,
overhead, backend, cost128, driver256). Prints the figures and writes (or replaces) this benchmark's
section of benchmarks/RESULTS.md.
"""

import argparse
import datetime
import json
import math
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import psutil
import starfile

from bench_common import REPO, BackgroundSampler, gnu_time, prime_executable, run_checked, update_results
from prime_plugin.core.directions import directions_for_count
from prime_plugin.core.fourier import fsc
from prime_plugin.core.geometry import euler_to_matrix
from prime_plugin.core.polar import default_n_rot

SHARED = Path(os.environ.get("PRIME_SHARED_DATA", REPO.parent / "shared" / "data"))
SECTION = "## Scaling: in-process vs Dask LocalCluster, memory against particle count"
APIX, BOX = 5.0, 64
SIZES = (10000, 50000, 100000)
SIMULATIONS = {
    "sim100k": ["--n", "100000", "--snr", "0.1", "--shift_px", "4", "--defocus", "1", "3", "--seed", "11", "--j", "2"],
    "sim3k": ["--n", "3000", "--snr", "0.1", "--shift_px", "4", "--defocus", "1", "3", "--seed", "7", "--j", "2"],
    "sim128": ["--n", "300", "--rescale_angpix", "2.5", "--snr", "0.1", "--shift_px", "4", "--defocus", "1", "3",
               "--seed", "13", "--j", "2"],
}
SAME_ARGS = ["--ref", "ref.mrc", "--update_frac", "0.5", "--max_iter", "4", "--seed", "3", "--j", "2"]
MEM_ARGS = ["--ref", "ref.mrc", "--update_frac", "0.1", "--max_iter", "1", "--seed", "3", "--j", "2"]
OVH_ARGS = ["--ref", "ref.mrc", "--update_frac", "0.25", "--max_iter", "4", "--seed", "3", "--j", "2"]
COST_ARGS = ["--ref", "ref.mrc", "--update_frac", "1", "--max_iter", "2", "--ini_high", "10", "--seed", "3", "--j", "2"]
LOCAL = ["--cluster", "local:2"]
REPEATS = 3
# One iteration at --update_frac 0.1: the command line's check sees max_iter 10, the run does --max_iter.
REFINE_ONE_ITERATION = (
    "import dataclasses, math, sys\n"
    "import prime_plugin.core.refine_setup as setup\n"
    "check = setup._check_numbers\n"
    "setup._check_numbers = lambda p: check(dataclasses.replace(p, max_iter=max(p.max_iter, math.ceil(1 / p.update_fraction))))\n"
    "from prime_plugin.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
# Scaling model assumptions (stated in the section).
MODEL = {"particles": 1_000_000, "box": 256, "nodes": 100, "cores_per_node": 32, "update_fraction": 0.1,
         "chunk_size": 256, "nspace": 2000, "n_peaks": 3, "network_GB_s": 1.25, "driver_speedup": 8.0,
         "ring_fraction": 0.5}


# ---------------------------------------------------------------- data

def make_data(cache):
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "ref.mrc").is_file():
        volume = np.ascontiguousarray(mrcfile.read(SHARED / "ribosome70S_65px.mrc")[:BOX, :BOX, :BOX], np.float32)
        with mrcfile.new(cache / "ref.mrc", overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = APIX
    for name, args in SIMULATIONS.items():
        if not (cache / name / "particles.star").is_file():
            print(f"[{now()}] prime simulate --map ref.mrc --o {name} {' '.join(args)}", flush=True)
            run_checked([prime_executable(), "simulate", "--map", "ref.mrc", "--o", name, *args], cache)
    subsets = [("sim100k", n) for n in SIZES if n < 100000] + [("sim3k", 1000)]
    for folder, n in subsets:
        path = cache / folder / f"particles_{n}.star"
        if not path.is_file():
            blocks = starfile.read(cache / folder / "particles.star", always_dict=True)
            blocks["particles"] = blocks["particles"].iloc[:n]
            starfile.write(blocks, path, float_format="%.8f")
    return {n: ("sim100k/particles.star" if n == 100000 else f"sim100k/particles_{n}.star") for n in SIZES}


def now():
    return f"{datetime.datetime.now():%H:%M:%S}"


# ---------------------------------------------------------------- timed runs with per-process memory

class TreeSampler(BackgroundSampler):
    """Every 0.5 s, the resident set (and its anonymous part) of every process under ``root`` (psutil)."""

    def __init__(self, root):
        super().__init__(period_s=0.5)
        self.root = root
        self.procs = {}  # pid -> {"depth", "cmd", "rss", "anon"} (peaks, MB)
        self.peak_total_mb = 0.0

    def sample(self):
        try:
            top = psutil.Process(self.root)
            tree = [(top, 0)]
            frontier = [(top, 0)]
            while frontier:
                proc, depth = frontier.pop()
                for child in proc.children():
                    tree.append((child, depth + 1))
                    frontier.append((child, depth + 1))
        except psutil.Error:
            return
        total = 0.0
        for proc, depth in tree:
            try:
                info = proc.memory_info()
                cmd = " ".join(proc.cmdline())[:200]
            except psutil.Error:
                continue
            rss, anon = info.rss / 2 ** 20, (info.rss - info.shared) / 2 ** 20
            total += rss
            entry = self.procs.setdefault(proc.pid, {"depth": depth, "cmd": cmd, "rss": 0.0, "anon": 0.0,
                                                     "parent": proc.ppid() if depth else None})
            if rss > entry["rss"]:
                entry["rss"], entry["peak_at"] = rss, time.time()
            entry["anon"] = max(entry["anon"], anon)
        self.peak_total_mb = max(self.peak_total_mb, total)


def roles(procs):
    """Name the sampled processes: GNU time (depth 0, left out), the client (the prime process, depth 1;
    a LocalCluster's scheduler and nannies run inside it), helpers (multiprocessing's resource tracker)
    and workers (every other process under the client)."""
    named = []
    for pid, p in procs.items():
        if p["depth"] == 0:
            continue
        if p["depth"] == 1:
            role = "client"
        elif "resource_tracker" in p["cmd"] or "semaphore_tracker" in p["cmd"]:
            role = "helper"
        else:
            role = "worker"
        named.append({"pid": pid, "role": role, "rss": round(p["rss"], 1), "anon": round(p["anon"], 1),
                      "peak_at": p.get("peak_at")})
    return sorted(named, key=lambda r: (["client", "worker", "helper"].index(r["role"]), -r["rss"]))


def workers_of(record):
    """The worker processes of a record (records made before the roles above named every process
    below the client "helper": those of more than 100 MB are the workers)."""
    return [p for p in record["processes"]
            if p["role"] == "worker" or (p["role"] == "helper" and p["rss"] > 100)]


def timed(name, argv, shown, cache, records, rerun):
    """Run argv in cache under GNU time with the tree sampler; store and return the record."""
    path = cache / f"record_{name}.json"
    if path.is_file() and not rerun:
        records[name] = json.loads(path.read_text())
        return records[name]
    time_file = cache / f"time_{name}.txt"
    time_file.unlink(missing_ok=True)
    print(f"[{now()}] {name}: {shown}", flush=True)
    load_before = os.getloadavg()[0]
    started = time.time()
    begin = time.perf_counter()
    with open(cache / f"{name}.stdout", "w") as out, open(cache / f"{name}.stderr", "w") as err:
        process = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(time_file), *argv], cwd=cache, stdout=out,
                                   stderr=err)
        with TreeSampler(process.pid) as sampler:
            returncode = process.wait()
    wall = time.perf_counter() - begin
    if returncode != 0:
        sys.exit(f"{name} failed (exit {returncode}): see {cache / (name + '.stderr')}")
    record = {"name": name, "command": shown, "wall_s": wall, "started": started, "gnu_time_rss_mb": gnu_time(time_file)["rss_mb"],
              "processes": roles(sampler.procs), "peak_total_mb": sampler.peak_total_mb,
              "load_before": load_before, "load_after": os.getloadavg()[0], "date": now()}
    print(f"    wall {wall:.1f} s, GNU time peak {record['gnu_time_rss_mb']:.0f} MB, sampled: "
          + ", ".join(f"{p['role']} {p['rss']:.0f} MB" for p in record["processes"] if p["role"] != "helper"),
          flush=True)
    record["cache"] = str(cache)
    path.write_text(json.dumps(record, indent=1))
    records[name] = record
    return record


def clear_stale(cache, out, rerun):
    """Remove the output folder ``out`` of a run that is about to run (no record, or asked to rerun)."""
    if (rerun or not (cache / f"record_{out}.json").is_file()) and (cache / out).exists():
        shutil.rmtree(cache / out)


def refine_cmd(star, out, args, local, wrapper=False):
    tail = ["refine", "--i", star, "--o", out, *args, *(LOCAL if local else [])]
    if wrapper:
        return [sys.executable, "-c", REFINE_ONE_ITERATION, *tail], "python -c REFINE_ONE_ITERATION " + " ".join(tail)
    return [prime_executable(), *tail], "prime " + " ".join(tail)


def visited_percent(run_dir):
    """The percentage of directions visited in each iteration, from run.log."""
    return [int(v) for v in re.findall(r"visited (\d+)% of the directions", (Path(run_dir) / "run.log").read_text())]


def iteration_seconds(run_dir):
    """[(iteration, ring limit, particles searched, seconds)] from run.log."""
    pattern = re.compile(r"iteration\s+(\d+): .*?alignment to (\d+) Fourier px, searched (\d+) particles.*?, "
                         r"([\d.]+) s$")
    rows = []
    for line in (Path(run_dir) / "run.log").read_text().splitlines():
        found = pattern.search(line)
        if found:
            rows.append((int(found.group(1)), int(found.group(2)), int(found.group(3)), float(found.group(4))))
    return rows


# ---------------------------------------------------------------- 1. same result

def rotation_angles_deg(a_deg, b_deg):
    a = euler_to_matrix(*np.asarray(a_deg, np.float64).T)
    b = euler_to_matrix(*np.asarray(b_deg, np.float64).T)
    cosine = (np.einsum("nij,nij->n", a, b) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def same_result(cache, records, rerun):
    runs = {}
    for label, local in (("inprocess", False), ("local2", True)):
        argv, shown = refine_cmd("sim3k/particles.star", f"same_{label}", SAME_ARGS, local)
        clear_stale(cache, f"same_{label}", "same" in rerun)
        runs[label] = timed(f"same_{label}", argv, shown, cache, records, "same" in rerun)
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    data = [starfile.read(cache / f"same_{label}" / "run_data.star", always_dict=True)["particles"]
            for label in runs]
    assert (data[0]["rlnImageName"].to_numpy() == data[1]["rlnImageName"].to_numpy()).all()
    diff = rotation_angles_deg(data[0][angles].to_numpy(), data[1][angles].to_numpy())
    _, step = directions_for_count("C1", 2000)
    maps = [mrcfile.read(cache / f"same_{label}" / "run_class001.mrc") for label in runs]
    curve = fsc(*maps)
    two_thirds = int(round(2 / 3 * (BOX // 2)))
    shift = [d[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() for d in data]
    return {"n": len(diff), "step_deg": float(step), "agree": float(np.mean(diff <= step)),
            "identical": float(np.mean(diff < 1e-3)), "median_deg": float(np.median(diff)),
            "p99_deg": float(np.percentile(diff, 99)), "max_deg": float(diff.max()),
            "shift_agree": float(np.mean(np.hypot(*(shift[0] - shift[1]).T) <= 0.5 * APIX)),
            "fsc_min": float(curve[1:two_thirds + 1].min()), "two_thirds": two_thirds,
            "fsc_min_all": float(curve[1:].min()),
            "wall": {label: r["wall_s"] for label, r in runs.items()},
            "iterations": {label: iteration_seconds(cache / f"same_{label}") for label in runs},
            "commands": [r["command"] for r in runs.values()]}


# ---------------------------------------------------------------- 2. memory

def memory(cache, stars, records, rerun):
    rows = []
    for n in SIZES:
        row = {"n": n}
        for label, local in (("inprocess", False), ("local2", True)):
            out = f"mem_{label}_{n}"
            clear_stale(cache, out, "memory" in rerun)
            argv, shown = refine_cmd(stars[n], out, MEM_ARGS, local, wrapper=True)
            row[label] = timed(out, argv, shown, cache, records, "memory" in rerun)
        tail = ["reconstruct", "--i", stars[n], "--o", f"rec_{n}.mrc", "--ctf", "--j", "2"]
        row["reconstruct"] = timed(f"rec_{n}", [prime_executable(), *tail], "prime " + " ".join(tail), cache,
                                   records, "memory" in rerun)
        rows.append(row)
    return rows


def peaks(record, role):
    return [p for p in record["processes"] if p["role"] == role]


def memory_columns(row):
    """(label, MB) series per size for the fits and the table."""
    inproc, local, rec = row["inprocess"], row["local2"], row["reconstruct"]
    client = peaks(local, "client")[0]
    workers = sorted(workers_of(local), key=lambda p: -p["rss"])
    return {
        "in-process prime (RSS)": peaks(inproc, "client")[0]["rss"],
        "in-process prime (anon)": peaks(inproc, "client")[0]["anon"],
        "local:2 client (RSS)": client["rss"],
        "local:2 client (anon)": client["anon"],
        "local:2 largest worker (RSS)": workers[0]["rss"] if workers else float("nan"),
        "local:2 largest worker (anon)": workers[0]["anon"] if workers else float("nan"),
        "local:2 all processes, peak of the sum": local["peak_total_mb"],
        "prime reconstruct (RSS)": peaks(rec, "client")[0]["rss"],
    }


def memory_reading(fits, mem_rows):
    """The paragraph that reads the memory table (from the fitted slopes)."""
    flat = 2.0  # MB per 1,000 particles; the stack itself is 16.4 (64^2 x 4 B per image)
    worker = fits["local:2 largest worker (RSS)"]
    chunks = [math.ceil(r["n"] / 2 / 256) * 2 for r in mem_rows]
    sizes = ", ".join(f"{r['n']:,}" for r in mem_rows)
    text = (f"Reading: the stack grows by 16.4 MB per 1,000 particles (64^2 x 4 B). The in-process run grows by "
            f"{fits['in-process prime (RSS)']:.2f} MB per 1,000 particles (anon "
            f"{fits['in-process prime (anon)']:.2f}), prime reconstruct by {fits['prime reconstruct (RSS)']:.2f}, "
            f"the local:2 client by {fits['local:2 client (RSS)']:.2f}: no images are held. What grows in the "
            f"in-process run and in prime reconstruct is the per-particle metadata (the STAR table in pandas, the "
            f"refinement state, the output tables): about 1 KB a particle or less. The Dask client holds more per "
            f"particle (about {fits['local:2 client (RSS)']:.1f} KB; not attributed here: the chunk descriptions "
            f"it submits and the outputs it gathers are candidates). ")
    if worker <= flat:
        text += f"The Dask workers stay flat too ({worker:.2f} MB per 1,000 particles)."
    else:
        text += (f"The Dask workers do not stay flat: the largest worker grows by {worker:.2f} MB per 1,000 "
                 f"particles. Their images are read chunk by chunk as in-process; what grows with the particles "
                 f"is the number of chunks of the final insertion pass ({', '.join(f'{c}' for c in chunks)} chunks "
                 f"of 256 at {sizes} particles), each making a partial sum (box 64: 12.8 MB) that waits in a "
                 f"worker's memory until the tree addition that consumes it runs (the growth, ~{worker:.0f} MB "
                 f"per 1,000 particles, is one such sum per {12.8 * 1000 / 256 / worker:.1f} chunks in the largest "
                 f"worker; not traced: it may be partial sums "
                 f"waiting because chunk tasks run ahead of the additions, or memory the allocator keeps after "
                 f"they are freed). At box 256 each partial sum is 0.8 GB: this is the first thing to change "
                 f"(a running sum per worker, section 4), and until then the Dask backend's worker memory is not "
                 f"independent of the particle count.")
        timed_rows = [r for r in mem_rows if peak_timing(r["local2"], r["n"])]
        text += peak_timing(timed_rows[-1]["local2"], timed_rows[-1]["n"]) if timed_rows else ""
        earlier = Path(mem_rows[-1]["local2"].get("cache", "")) / f"old_record_mem_local2_{mem_rows[-1]['n']}.json"
        if timed_rows and earlier.is_file():
            old = json.loads(earlier.read_text())
            old_workers = sorted((p["rss"] for p in workers_of(old)), reverse=True)
            text += (f" (That run was made a second time to record when the workers peak; the first, under more "
                     f"load, gave workers of {' and '.join(f'{w:.0f}' for w in old_workers)} MB, GNU time "
                     f"{old['gnu_time_rss_mb']:.0f} MB, {old['wall_s']:.0f} s.)")
    return [text]


def peak_timing(record, n):
    """When the workers of a local:2 run peaked: in the search iteration or in the final insertion pass
    (run.log's time stamp of iteration 1 separates them; records made before peak times were kept say nothing)."""
    workers = [p for p in workers_of(record) if p.get("peak_at")]
    log = Path(record.get("cache", "")) / record["command"].split("--o ")[1].split()[0] / "run.log"
    if not workers or not log.is_file():
        return ""
    stamp = next((line[:19] for line in log.read_text().splitlines() if "iteration   1:" in line), None)
    if stamp is None:
        return ""
    end_of_search = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp()
    moments = " and ".join(f"{p['peak_at'] - record['started']:.0f} s" for p in workers)
    where = ("after the search iteration, in the final insertion pass" if all(p["peak_at"] > end_of_search + 1
                                                                              for p in workers)
             else "not all in the final insertion pass")
    return (f" In the run at {n:,} particles the workers peaked at {moments} after the start, the search "
            f"iteration having ended at "
            f"{end_of_search - record['started']:.0f} s: {where}.")


def slope_mb_per_1000(ns, values):
    ns, values = np.asarray(ns, float), np.asarray(values, float)
    slope, intercept = np.polyfit(ns / 1000.0, values, 1)
    return float(slope), float(intercept)


# ---------------------------------------------------------------- 3. overhead

def empty_task(chunk, shared):
    """A task that does no work: returns a partial sum of the real size (the backend's cost alone)."""
    from prime_plugin.core.reconstruct import FourierSums

    return None, FourierSums.zeros(chunk)


def backend_alone(cache, records, rerun, chunks_per_iteration=2):
    path = cache / "record_backend.json"
    if path.is_file() and "backend" not in rerun:
        return json.loads(path.read_text())
    from prime_plugin.core.execution import DaskBackend

    # The shared object of a box-64 iteration: both halves' PolarReferences at the first ring limit.
    d = len(directions_for_count("C1", 2000)[0])
    n_rot = default_n_rot(0.9 * BOX / 2)
    k = int(np.floor(BOX * APIX / 40.0)) - 1
    shared = np.zeros((2, d, k, n_rot // 2 + n_rot // 2 + 1), np.complex64)  # one object, as SearchSettings
    print(f"[{now()}] backend alone: DaskBackend.start_local(2), {chunks_per_iteration} empty chunks, shared "
          f"{shared.nbytes / 1e6:.0f} MB", flush=True)
    start = time.perf_counter()
    backend = DaskBackend.start_local(2)
    started = time.perf_counter() - start
    times = []
    try:
        for repeat in range(6):
            begin = time.perf_counter()
            backend.map_reduce(empty_task, [BOX] * chunks_per_iteration, shared,
                               [1 + i % 2 for i in range(chunks_per_iteration)], name=f"empty{repeat}")
            times.append(time.perf_counter() - begin)
    finally:
        begin = time.perf_counter()
        backend.close()
        closed = time.perf_counter() - begin
    record = {"start_s": started, "close_s": closed, "map_reduce_s": times[1:], "first_s": times[0],
              "shared_MB": shared.nbytes / 1e6, "chunks": chunks_per_iteration}
    path.write_text(json.dumps(record, indent=1))
    return record


def overhead(cache, records, rerun):
    per = {"inprocess": [], "local2": []}
    walls = {"inprocess": [], "local2": []}
    for repeat in range(1, REPEATS + 1):
        for label, local in (("inprocess", False), ("local2", True)):
            out = f"ovh_{label}_{repeat}"
            clear_stale(cache, out, "overhead" in rerun)
            argv, shown = refine_cmd("sim3k/particles_1000.star", out, OVH_ARGS, local)
            record = timed(out, argv, shown, cache, records, "overhead" in rerun)
            per[label] += [s for *_, s in iteration_seconds(cache / out)]
            walls[label].append(record["wall_s"])
    return {"per_iteration": per, "walls": walls, "commands": [records["ovh_inprocess_1"]["command"],
                                                               records["ovh_local2_1"]["command"]]}


# ---------------------------------------------------------------- 4. scaling model

def cost128(cache, records, rerun):
    clear_stale(cache, "cost128", "cost128" in rerun)
    argv, shown = refine_cmd("sim128/particles.star", "cost128", COST_ARGS, False)
    record = timed("cost128", argv, shown, cache, records, "cost128" in rerun)
    return {"record": record, "iterations": iteration_seconds(cache / "cost128"),
            "visited": visited_percent(cache / "cost128")}


def timed_call(function, repeats=1):
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - begin)
    return float(np.median(times)), value


def driver_costs(cache, rerun, box, ring_limit, tag):
    """The driver's per-iteration work at ``box``, timed here (2 threads): two partial sums added, one
    reconstruction, one FSC, and the polar references of one half map (projector + 2000 directions)."""
    path = cache / f"record_driver{tag}.json"
    if path.is_file() and "driver256" not in rerun:
        return json.loads(path.read_text())
    from prime_plugin.core.polar import PolarGrid
    from prime_plugin.core.projector import FourierProjector
    from prime_plugin.core.reconstruct import FourierSums, reconstruct_volume
    from prime_plugin.core.search import PolarReferences

    print(f"[{now()}] driver costs at box {box}", flush=True)
    rng = np.random.default_rng(0)
    a, b = FourierSums.zeros(box), FourierSums.zeros(box)
    for s in (a, b):
        s.U.real[...] = rng.standard_normal(s.U.shape, np.float32)
        s.rho[...] = 1.0 + rng.random(s.rho.shape, np.float32)
    figures = {"sums_bytes": a.U.nbytes + a.rho.nbytes}
    figures["add_s"], total = timed_call(lambda: a + b, 2)
    del total
    figures["iadd_s"], _ = timed_call(lambda: a.__iadd__(b), 2)
    figures["reconstruct_s"], volume = timed_call(lambda: reconstruct_volume(b))
    del a, b
    figures["fsc_s"], _ = timed_call(lambda: fsc(volume, volume))
    directions, _ = directions_for_count("C1", 2000)
    grid = PolarGrid(box, 2, ring_limit, default_n_rot(0.9 * box / 2))
    figures["projector_s"], projector = timed_call(lambda: FourierProjector(volume))
    figures["references_s"], refs = timed_call(lambda: PolarReferences.from_projector(projector, directions, grid))
    figures["references_bytes"] = sum(x.nbytes for x in (refs.directions_deg, refs.sections, refs.spectra,
                                                         refs.powers))
    figures["references_shapes"] = {"sections": list(refs.sections.shape), "spectra": list(refs.spectra.shape),
                                    "powers": list(refs.powers.shape)}
    figures.update(box=box, ring_limit=ring_limit, n_rot=grid.n_rot, directions=len(directions))
    path.write_text(json.dumps(figures, indent=1))
    return figures


def per_particle_bytes(n_peaks=3, k=256):
    """Pickled sizes per particle of a search task's input (without the shared data) and output."""
    from prime_plugin.core.ctf import CtfParams  # noqa: F401 (the chunk carries CtfParams)
    from prime_plugin.core.refine_tasks import ChunkOrientations

    rows = np.arange(k, dtype=np.int64)
    output = ChunkOrientations.empty(rows, n_peaks)
    # The input: rows, origins, previous orientation, 3 CTF floats + image index per particle (the
    # image locations are a stack path and row indices).
    inputs = (rows, np.zeros((k, 2)), np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros((k, 4)), rows)
    return len(pickle.dumps(inputs)) / k, len(pickle.dumps(output)) / k


def star_write_cost(cache, stars):
    """Seconds and bytes per row of write_particles (the per-iteration STAR file), on the 100k table.
    (The refinement's table has a few more columns: angles, origins, correlation.)"""
    from prime_plugin.core.star import read_particles, write_particles

    table = read_particles(str(cache / stars[100000]))
    seconds, _ = timed_call(lambda: write_particles(table, str(cache / "write_test.star")))
    size = (cache / "write_test.star").stat().st_size
    (cache / "write_test.star").unlink(missing_ok=True)
    return seconds / len(table.particles), size / len(table.particles)


def scaling_model(cost, d256, d128, bytes_in, bytes_out, star_s_per_particle):
    m = MODEL
    box = m["box"]
    it = {i: (ring, n, s) for i, ring, n, s in cost["iterations"]}
    # Core-seconds per particle at box 128 (2 threads; the machine was shared, so an upper bound), the
    # driver's own work in the iteration's seconds removed (measured at box 128 here).
    driver128 = 4 * d128["reconstruct_s"] + 3 * d128["fsc_s"] + 2 * (d128["projector_s"] + d128["references_s"])
    exhaustive128 = max(it[1][2] - driver128, 0.1 * it[1][2]) * 2 / it[1][1]
    shc128 = max(it[2][2] - driver128, 0.1 * it[2][2]) * 2 / it[2][1]
    k128, nrot128 = it[2][0] - 1, default_n_rot(0.9 * 128 / 2)
    k256 = int(m["ring_fraction"] * box / 2) - 1
    nrot256 = default_n_rot(0.9 * box / 2)
    scale = (k256 * nrot256) / (k128 * nrot128)  # per-pair and shift refinement ~ K n_rot; insertion ~ box^2 (4x)
    shc256, exhaustive256 = shc128 * scale, exhaustive128 * scale
    searched = int(m["particles"] * m["update_fraction"])
    chunks_per_half = math.ceil(searched / 2 / m["chunk_size"])
    chunks = 2 * chunks_per_half
    sums_bytes = d256["sums_bytes"]
    cores = m["nodes"] * m["cores_per_node"]
    waves = math.ceil(chunks / m["nodes"])
    compute_s = waves * m["chunk_size"] * shc256 / m["cores_per_node"]
    bw = m["network_GB_s"] * 1e9
    # Tree reduction, both halves at once: at each level every addition pulls one operand over the
    # network (co-location ignored), spread over the nodes; levels run one after the other.
    level, tree_s, transfers = chunks_per_half, 0.0, 0
    while level > 1:
        adds = 2 * (level // 2)
        transfers += adds
        tree_s += math.ceil(adds / m["nodes"]) * (sums_bytes / bw + d256["add_s"])
        level = level - level // 2
    gather_s = 2 * sums_bytes / bw
    k_max = box // 2 - 2 - 1
    refs_bytes_at = lambda k: 2 * d256["directions"] * k * (nrot256 + 1) * 8 + 2 * d256["directions"] * k * 4
    refs_bytes = refs_bytes_at(k256)
    # Dask's scatter(broadcast=True): the client sends one copy, then the scheduler's replicate copies
    # worker to worker, each holder serving 2 new ones per round (branching factor 2: holders triple).
    rounds = math.ceil(math.log(m["nodes"]) / math.log(3) - 1e-9)
    broadcast_s = (1 + 2 * rounds) * refs_bytes / bw
    driver_s = (4 * d256["reconstruct_s"] + 3 * d256["fsc_s"] + 2 * (d256["projector_s"] + d256["references_s"])
                + 2 * d256["add_s"])
    driver_fast_s = driver_s / m["driver_speedup"]
    star_s = star_s_per_particle[0] * m["particles"]
    per_worker_sum_transfers = m["nodes"] * 2
    return {
        "exhaustive128": exhaustive128, "shc128": shc128, "driver128": driver128, "k128": k128, "nrot128": nrot128,
        "k256": k256, "nrot256": nrot256, "scale": scale, "shc256": shc256, "exhaustive256": exhaustive256,
        "searched": searched, "chunks": chunks, "chunks_per_half": chunks_per_half, "cores": cores, "waves": waves,
        "compute_s": compute_s, "ideal_compute_s": searched * shc256 / cores, "sums_bytes": sums_bytes,
        "partials_bytes": chunks * sums_bytes, "tree_transfers": transfers, "tree_s": tree_s, "gather_s": gather_s,
        "refs_bytes": refs_bytes, "refs_bytes_max": refs_bytes_at(k_max), "k_max": k_max,
        "broadcast_s": broadcast_s, "broadcast_rounds": rounds,
        "reduce_scatter_s": 2 * 2 * sums_bytes / bw,
        "out_bytes": searched * (bytes_in + bytes_out), "bytes_in": bytes_in, "bytes_out": bytes_out,
        "driver_s": driver_s, "driver_fast_s": driver_fast_s, "star_s": star_s,
        "tasks": chunks * 3 + 2 * (chunks_per_half - 1), "worker_sum_transfers": per_worker_sum_transfers,
        "worker_sum_s": math.ceil(math.log2(m["nodes"])) * (sums_bytes / bw + d256["add_s"]),
        "node_partials_GB": math.ceil(chunks / m["nodes"]) * sums_bytes / 1e9,
    }


# ---------------------------------------------------------------- report

def fmt_mb(x):
    return f"{x:,.0f}"


def section(same, mem_rows, ovh, backend, cost, d128, d256, model, bytes_in, bytes_out, star_s, command_line,
            records, total_s):
    m = MODEL
    loads = [r["load_before"] for r in records.values()]
    lines = [SECTION, "",
             f"Command: `{command_line}` (run from the repository root; runs whose record is in the cache are not "
             f"repeated), {datetime.date.today().isoformat()}, {os.cpu_count()} cores, shared with other "
             f"benchmarks and test runs (RELION, prime refine) during most runs (1-minute load average {min(loads):.1f}-{max(loads):.1f} at the "
             f"starts of the runs; 2 alone would be a quiet machine), so every wall time here is inflated and "
             f"noisy. Sum of the timed runs' wall times: {sum(r['wall_s'] for r in records.values()) / 60:.1f} min "
             f"(data simulation and in-script timings not included). Data, exact commands and "
             f"method: the script's docstring. Box 64, 5 A/px, `prime simulate` CTF 1-3 um, SNR 0.1, origins up to "
             f"4 px.", "",
             "### 1. Same result, in-process vs `--cluster local:2`", "",
             f"3,000 particles, 4 iterations at --update_frac 0.5 (every particle searched twice), --seed 3:", "",
             *[f"    {c}" for c in same["commands"]], "",
             "| figure | value | goal |", "|---|---|---|",
             f"| final orientations within the direction step ({same['step_deg']:.2f} deg, --nspace 2000) | "
             f"{100 * same['agree']:.2f}% of {same['n']} | >= 99% |",
             f"| identical (< 0.001 deg) | {100 * same['identical']:.2f}% | |",
             f"| angle between the two runs' rotations: median / 99th percentile / max | {same['median_deg']:.3g} / "
             f"{same['p99_deg']:.3g} / {same['max_deg']:.3g} deg | |",
             f"| origins within 0.5 px | {100 * same['shift_agree']:.2f}% | |",
             f"| FSC(run_class001 in-process, local:2): minimum up to 2/3 Nyquist (shell {same['two_thirds']}) | "
             f"{same['fsc_min']:.6f} (1 - {1 - same['fsc_min']:.1e}) | >= 0.99 |",
             f"| FSC minimum over all shells | {same['fsc_min_all']:.6f} (1 - {1 - same['fsc_min_all']:.1e}) | |",
             f"| wall time, whole command: in-process / local:2 | {same['wall']['inprocess']:.0f} s / "
             f"{same['wall']['local2']:.0f} s | |",
             f"| per iteration (run.log): in-process | {', '.join(f'{s:.1f}' for *_, s in same['iterations']['inprocess'])} s | |",
             f"| per iteration (run.log): local:2 | {', '.join(f'{s:.1f}' for *_, s in same['iterations']['local2'])} s | |",
             "",
             "The two runs give the same orientations to rounding (the tasks' random streams are seeded per chunk, "
             "and the sums differ only in the order of float32 additions). The first iteration cost the same both "
             "ways; the later ones, hill climbing above all (iterations 3 and 4), ran faster on 2 one-thread "
             "workers than in one 2-thread process, which suggests that the search uses 2 threads inside one "
             "process less well than 2 processes (per-particle origin refinement, small products). On a machine "
             "this loaded, differences of a few seconds are within the noise.", ""]
    # memory
    ns = [r["n"] for r in mem_rows]
    cols = [memory_columns(r) for r in mem_rows]
    keys = list(cols[0])
    lines += ["### 2. Peak memory against particle count (box 64)", "",
              "One iteration searching 10% of the particles, then the final insertion of all of them (the "
              "command line refuses `--update_frac 0.1 --max_iter 1`; see the docstring's REFINE_ONE_ITERATION: the "
              "same entry point with the argument check given max_iter 10). Peaks sampled every 0.5 s (psutil) "
              "per process; anon = RSS minus file-backed/shared pages (the memory-mapped stack's pages). "
              "GNU time's maximum RSS is given for the whole command as a cross-check (the largest single process "
              "of the tree; where it is above the sampled peak, the peak lasted less than the 0.5 s sampling "
              "interval, e.g. the output tables written at the end).", "",
              "    python -c REFINE_ONE_ITERATION refine --i sim100k/particles_N.star --ref ref.mrc --o mem_inprocess_N "
              "--update_frac 0.1 --max_iter 1 --seed 3 --j 2 [--cluster local:2]",
              "    prime reconstruct --i sim100k/particles_N.star --o rec_N.mrc --ctf --j 2", "",
              "| peak (MB) | " + " | ".join(f"{n:,}" for n in ns) + " | MB per extra 1,000 particles (fit) |",
              "|---|" + "---|" * (len(ns) + 1)]
    fits = {}
    for key in keys:
        values = [c[key] for c in cols]
        slope, _ = slope_mb_per_1000(ns, values)
        fits[key] = slope
        lines.append(f"| {key} | " + " | ".join(fmt_mb(v) for v in values) + f" | {slope:.2f} |")
    for label, key in (("in-process GNU time max RSS", "inprocess"), ("local:2 GNU time max RSS (largest process)",
                                                                         "local2"),
                       ("reconstruct GNU time max RSS", "reconstruct")):
        values = [r[key]["gnu_time_rss_mb"] for r in mem_rows]
        slope, _ = slope_mb_per_1000(ns, values)
        lines.append(f"| {label} | " + " | ".join(fmt_mb(v) for v in values) + f" | {slope:.2f} |")
    for label, key in (("wall, in-process (s)", "inprocess"), ("wall, local:2 (s)", "local2"),
                       ("wall, reconstruct (s)", "reconstruct")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]['wall_s']:.0f}" for r in mem_rows) + " | |")
    last = mem_rows[-1]["local2"]
    lines += ["", f"Processes of the local:2 run at {ns[-1]:,} particles (peak RSS / anon MB): client "
              f"{peaks(last, 'client')[0]['rss']:.0f} / {peaks(last, 'client')[0]['anon']:.0f}, " +
              ", ".join(f"worker {p['rss']:.0f} / {p['anon']:.0f}" for p in workers_of(last)) +
              " (and the resource tracker, ~13 MB).", "",
              *memory_reading(fits, mem_rows), ""]
    # overhead
    med = {k: float(np.median(v)) for k, v in ovh["per_iteration"].items()}
    walls = {k: float(np.median(v)) for k, v in ovh["walls"].items()}
    bmed = float(np.median(backend["map_reduce_s"]))
    lines += ["### 3. Scheduler overhead per iteration (1,000 particles, box 64)", "",
              "4 iterations of 250 particles (one chunk of 125 per half), 3 repetitions interleaved:", "",
              *[f"    {c}" for c in ovh["commands"]], "",
              "| figure | in-process (--j 2) | local:2 (1 thread per worker) | difference |", "|---|---|---|---|",
              f"| per iteration, median of {len(ovh['per_iteration']['inprocess'])} (s) | {med['inprocess']:.2f} | "
              f"{med['local2']:.2f} | {med['local2'] - med['inprocess']:+.2f} |",
              f"| per iteration, all (s) | {', '.join(f'{x:.1f}' for x in ovh['per_iteration']['inprocess'])} | "
              f"{', '.join(f'{x:.1f}' for x in ovh['per_iteration']['local2'])} | |",
              f"| whole command, median of 3 (s) | {walls['inprocess']:.1f} | {walls['local2']:.1f} | "
              f"{walls['local2'] - walls['inprocess']:+.1f} |", "",
              f"The difference of the per-iteration medians mixes the Dask costs with the different split of the "
              f"same work (in-process: each chunk on 2 threads in turn; local:2: the two chunks at once, one thread "
              f"each; and the machine's other load). The backend alone, measured directly: "
              f"DaskBackend.map_reduce of {backend['chunks']} empty tasks returning box-64 partial sums "
              f"(12.8 MB each), with a shared object of {backend['shared_MB']:.0f} MB (both halves' references at "
              f"the first ring limit), takes {bmed * 1000:.0f} ms per call (median of {len(backend['map_reduce_s'])}; "
              f"first call {backend['first_s'] * 1000:.0f} ms); starting the 2-worker LocalCluster "
              f"{backend['start_s']:.1f} s and stopping it {backend['close_s']:.1f} s once per command. Estimate: "
              f"the Dask backend costs ~{bmed:.1f}-{max(bmed, med['local2'] - med['inprocess']):.1f} s per "
              f"iteration here (broadcast of the references, two partial sums moved and added, the totals "
              f"gathered), and ~{backend['start_s'] + backend['close_s']:.0f} s per command for the local "
              f"cluster; against iterations of ~{med['inprocess']:.0f} s on this small set, and independent of "
              f"the particle count except through the number of chunks.", ""]
    # model
    gb = 1e9
    lines += ["### 4. Scaling model: 1,000,000 particles, box 256, 100 nodes", "",
              f"Assumptions: {m['nodes']} nodes of {m['cores_per_node']} cores, one Dask worker per node using "
              f"all its cores (as `--scheduler` advises); network {m['network_GB_s']} GB/s per node (10 GbE); "
              f"--update_frac {m['update_fraction']} ({model['searched']:,} particles searched per iteration, "
              f"mostly hill climbing), chunk {m['chunk_size']} ({model['chunks_per_half']} chunks per half, "
              f"{model['chunks']} in all), --nspace {m['nspace']} ({d256['directions']} directions), "
              f"{m['n_peaks']} peaks; alignment to half Nyquist at box 256 (K = {model['k256']} rings), "
              f"n_rot = {model['nrot256']} (the default for the default mask); the driver runs on one node "
              f"{m['driver_speedup']:.0f}x faster than on these 2 shared cores (assumed, not measured).", "",
              f"Measured here: per-particle search + insertion at box 128 (`{cost['record']['command']}`, 300 "
              f"particles, K = {model['k128']}, n_rot = {model['nrot128']}): "
              f"{model['exhaustive128'] * 1000:.0f} ms (exhaustive first search) and {model['shc128'] * 1000:.0f} ms "
              f"(hill climbing; that iteration visited {cost['visited'][-1]}% "
              f"of the directions, its worst case) of core time per particle (iteration wall x 2 threads, less the driver's "
              f"{model['driver128']:.1f} s measured at box 128; an upper bound on a shared machine). Scaled to box "
              f"256 by K n_rot (x{model['scale']:.1f}; insertion scales by box^2, x4): "
              f"{model['shc256'] * 1000:.0f} ms (hill climbing), {model['exhaustive256'] * 1000:.0f} ms (exhaustive). "
              f"Driver work timed at box 256 on 2 threads: adding two partial sums {d256['add_s']:.2f} s "
              f"(in place {d256['iadd_s']:.2f} s), one reconstruction {d256['reconstruct_s']:.1f} s, one FSC "
              f"{d256['fsc_s']:.1f} s, projector {d256['projector_s']:.1f} s + polar references of one half "
              f"map {d256['references_s']:.1f} s (K = {d256['ring_limit'] - 1}). Per-particle STAR writing "
              f"{star_s[0] * 1e6:.1f} us and {star_s[1]:.0f} B (100k rows, write_particles). The polar "
              f"references are the driver's largest item.", "",
              "| per iteration | size | time (model) |", "|---|---|---|",
              f"| broadcast: polar references of both halves, sections + spectra complex64 ({d256['directions']}, K, "
              f"{model['nrot256'] // 2}) + ({d256['directions']}, K, {model['nrot256'] // 2 + 1}), powers float32 | "
              f"{model['refs_bytes'] / gb:.2f} GB at K = {model['k256']} ({model['refs_bytes_max'] / gb:.2f} GB at "
              f"the largest ring limit, K = {model['k_max']}) per worker, x{m['nodes']} workers | "
              f"{model['broadcast_s']:.0f} s (Dask's broadcast scatter: one copy from the client, then "
              f"{model['broadcast_rounds']} rounds of worker-to-worker replication, 2 copies served per holder per "
              f"round) |",
              f"| per-chunk partial sums: U complex64 + rho float32, ({2 * m['box']}, {2 * m['box']}, "
              f"{m['box'] + 1}) | {model['sums_bytes'] / gb:.3f} GB per chunk, {model['partials_bytes'] / gb:.0f} GB "
              f"made per iteration, {model['tree_transfers']} additions each pulling one over the network | "
              f"{model['tree_s']:.0f} s (tree of {math.ceil(math.log2(model['chunks_per_half']))} levels, both halves "
              f"at once) + {model['gather_s']:.1f} s for the two totals to the client |",
              f"| per-particle inputs and outputs (pickled: {model['bytes_in']:.0f} + {model['bytes_out']:.0f} B per "
              f"particle) | {model['out_bytes'] / 1e6:.0f} MB | < 1 s |",
              f"| search + insertion, {model['searched']:,} particles on {model['cores']:,} cores | | "
              f"{model['compute_s']:.1f} s ({model['waves']} waves of {m['chunk_size']}-particle chunks, one per "
              f"node at a time; {model['ideal_compute_s']:.1f} s if perfectly balanced) |",
              f"| driver: 4 reconstructions, 3 FSCs, 2 projectors + reference sets, sum updates | | "
              f"{model['driver_s']:.0f} s on 2 cores, ~{model['driver_fast_s']:.0f} s assumed on one node |",
              f"| driver: run_itNNN_data.star of {m['particles']:,} rows | {star_s[1] * m['particles'] / 1e6:.0f} MB | "
              f"{model['star_s']:.0f} s (measured per row, scaled) |",
              f"| scheduler: ~{model['tasks']:,} tasks | | ~{model['tasks'] * 1e-3:.1f} s at ~1 ms per task "
              f"(Dask's documented order of magnitude; not measured at this scale) |", ""]
    total = (model['broadcast_s'] + model['tree_s'] + model['gather_s'] + model['compute_s']
             + model['driver_fast_s'] + model['star_s'])
    lines += [
        f"Reading the model: one iteration would take about {total:.0f} s, of which the search and insertion "
        f"proper are {model['compute_s']:.0f} s. The particle work divides by the node count; what does not: the "
        f"broadcast of the references ({model['refs_bytes'] / gb:.1f}-{model['refs_bytes_max'] / gb:.1f} GB to "
        f"every worker, each iteration), the tree reduction of {model['chunks']} partial sums of "
        f"{model['sums_bytes'] / gb:.2f} GB ({model['partials_bytes'] / gb:.0f} GB made and mostly moved per "
        f"iteration, for partial sums that each hold only {m['chunk_size']} images), the driver's serial "
        f"reconstruction/FSC/references and the STAR file of all particles. With 100 nodes the fixed costs "
        f"already exceed the compute; more nodes would not make an iteration faster. Memory per node: up to "
        f"{model['node_partials_GB']:.1f} GB of partial sums waiting to be added plus the references.", "",
        "Design changes the model suggests (none made here):", "",
        f"- A running sum per worker (as the in-process backend keeps): each worker adds its chunks' partial "
        f"sums in place (here an in-place addition of two box-256 sums takes {d256['iadd_s']:.2f} s, Dask's `+` "
        f"into new arrays {d256['add_s']:.1f} s, mostly first touches of fresh pages) and contributes one sum per "
        f"half, so the reduction moves {model['worker_sum_transfers']} "
        f"sums instead of {model['tree_transfers']} and per-node memory falls to one sum per half instead of up "
        f"to {model['node_partials_GB']:.1f} GB; the tree over the workers still has "
        f"{math.ceil(math.log2(m['nodes']))} levels (~{model['worker_sum_s']:.0f} s against {model['tree_s']:.0f} s: "
        f"the gain is in bytes and memory more than in time).",
        f"- Beyond that, a bandwidth-optimal reduction: the grid cut into slabs, each worker summing one slab of "
        f"every worker's sum (reduce-scatter), then the slabs gathered: ~{model['reduce_scatter_s']:.1f} s per "
        f"iteration at {m['network_GB_s']} GB/s whatever the node count, instead of a time growing with "
        f"log2(nodes).",
        f"- Larger chunks for the Dask backend (e.g. 2,000-5,000 particles): the partial sums per chunk do not "
        f"grow with the chunk, so bytes per particle fall in proportion.",
        f"- Broadcast the two half maps ({2 * m['box'] ** 3 * 4 / 1e6:.0f} MB) instead of the polar references "
        f"and let each worker build its references ({d256['projector_s'] + d256['references_s']:.0f} s per half "
        f"map here on 2 cores, in parallel on every node): {2 * m['box'] ** 3 * 4 / 1e6:.0f} MB instead of "
        f"{model['refs_bytes'] / 1e9:.1f}-{model['refs_bytes_max'] / 1e9:.1f} GB per worker.",
        f"- Distribute the driver's reconstruction (the two halves on two workers) and write the per-iteration "
        f"STAR file only every few iterations or in a binary form at this scale.", "",
        "What is measured and what is assumed: measured here are the box-64 runs, the box-128 per-particle costs "
        "(on a machine shared with RELION, so upper bounds), the box-256 driver timings on 2 threads, the array "
        "shapes and pickled sizes; assumed are the node count and cores, perfect scaling of the per-particle "
        "work with cores inside a node, the K n_rot scaling from box 128 to 256, the network bandwidth, "
        "the driver speed-up on a big node, the ~1 ms per task, and a reduction in which every addition pulls "
        "one operand over the network.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, type=Path, help="data and run folder (data made once)")
    parser.add_argument("--rerun", nargs="*", default=[],
                        choices=["same", "memory", "overhead", "backend", "cost128", "driver256"],
                        help="parts to repeat although their records are in the cache")
    parser.add_argument("--no_results", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    cache = args.cache.resolve()
    rerun = set(args.rerun)
    stars = make_data(cache)
    records = {}
    same = same_result(cache, records, rerun)
    ovh = overhead(cache, records, rerun)
    backend = backend_alone(cache, records, rerun)
    mem_rows = memory(cache, stars, records, rerun)
    cost = cost128(cache, records, rerun)
    d128 = driver_costs(cache, rerun, 128, cost["iterations"][-1][1], "128")
    d256 = driver_costs(cache, rerun, 256, int(MODEL["ring_fraction"] * 256 / 2), "256")
    bytes_in, bytes_out = per_particle_bytes()
    star_s = star_write_cost(cache, stars)
    model = scaling_model(cost, d256, d128, bytes_in, bytes_out, star_s)
    (cache / "model.json").write_text(json.dumps(model, indent=1))
    command_line = "python benchmarks/bench_scale.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = section(same, mem_rows, ovh, backend, cost, d128, d256, model, bytes_in, bytes_out, star_s,
                   command_line, records, time.perf_counter() - begin)
    print(text)
    if not args.no_results:
        update_results(SECTION, text)


if __name__ == "__main__":
    main()
