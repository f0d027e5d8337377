"""What the benchmark scripts share: finding ``prime``, running a checked command, a
background sampler thread, a timed run of a command (wall, CPU, peak memory, load, with
pauses left out) and the writer of a benchmark's section of RESULTS.md (the scripts run as
``python benchmarks/bench_*.py``, so this folder is on their import path)."""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def prime_executable():
    """The ``prime`` script beside this interpreter (the environment being measured), else PATH's."""
    beside = Path(sys.executable).parent / "prime"
    return str(beside) if beside.is_file() else (shutil.which("prime") or "prime")


def run_checked(cmd, cwd):
    """Run ``cmd`` in ``cwd``; stop the benchmark with its output if it fails. Returns its stdout."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


class BackgroundSampler:
    """Calls ``self.sample()`` every ``period_s`` seconds in a thread while used as a context manager."""

    def __init__(self, period_s):
        self.period_s = period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.period_s):
            self.sample()

    def sample(self):
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def gnu_time(path):
    """Wall, user, system seconds and peak RSS (MB) from a GNU time -v report."""
    text = path.read_text() if path.is_file() else ""
    figures = {}
    for key, pattern in (("user_s", r"User time \(seconds\): ([\d.]+)"), ("sys_s", r"System time \(seconds\): ([\d.]+)"),
                         ("rss_mb", r"Maximum resident set size \(kbytes\): (\d+)")):
        found = re.search(pattern, text)
        figures[key] = float(found.group(1)) / (1024 if key == "rss_mb" else 1) if found else float("nan")
    return figures


class RunSampler(BackgroundSampler):
    """While a run lasts: the 1-minute load average every 10 s (with its epoch time), and every 2 s the summed resident set
    and CPU time of the run's process tree (read from /proc), which survive a run stopped by a signal."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self):
        super().__init__(period_s=2.0)
        self.loads, self.peak_rss_mb, self.cpu_ticks = [], 0.0, {}
        self.root, self.step = None, 0

    def sample(self):
        self.step += 1
        if self.step % 5 == 0:
            self.loads.append((time.time(), os.getloadavg()[0]))
        if self.root is not None:
            self._tree()

    def _tree(self):
        table = process_table()
        tree = [pid for pid in process_tree(self.root, table) if pid in table]
        rss = sum(table[pid][2] for pid in tree)
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2 ** 20)
        for pid in tree:
            self.cpu_ticks[pid] = table[pid][1]

    @property
    def cpu_s(self):
        return sum(self.cpu_ticks.values()) / self.TICK


def timed_run(name, argv, shown, cache, limit_s=None):
    """Run ``argv`` in ``cache`` under GNU time; store and return its timing record.

    ``limit_s`` bounds the run's own running time: the periods during which it was suspended by
    :func:`suspend_run` are left out of it, of ``wall_s`` (``paused_s`` says how much) and of the
    load figures."""
    time_file = cache / f"time_{name}.txt"
    # A pause log left by an earlier run of the same name would be subtracted from this one.
    for old in [time_file, cache / f"{name}.pauses", *cache.glob(f"rss_{name}_rank_*")]:
        old.unlink(missing_ok=True)
    record = {"name": name, "command": shown, "load_before": os.getloadavg()[0], "started": time.time()}
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {shown}", flush=True)
    begin = time.perf_counter()
    with RunSampler() as sampler, open(cache / f"{name}.stdout", "w") as out, \
            open(cache / f"{name}.stderr", "w") as err:
        process = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(time_file), *argv], cwd=cache, stdout=out,
                                   stderr=err, start_new_session=True)
        sampler.root = process.pid
        (cache / f"{name}.pgid").write_text(str(process.pid))
        try:
            record["returncode"] = _wait_running(process, cache / f"{name}.pauses", begin, limit_s)
            record["stopped"] = False
        except subprocess.TimeoutExpired:
            # Our own process group (GNU time and mpirun); mpirun stops its ranks. GNU time dies
            # without a report, so the figures of a stopped run are the sampler's.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            record["returncode"], record["stopped"] = process.returncode, True
    pauses = read_pauses(cache / f"{name}.pauses")
    record["pauses"] = pauses
    record["paused_s"] = sum(end - start for start, end in pauses)
    record["wall_s"] = time.perf_counter() - begin - record["paused_s"]
    loads = [load for moment, load in sampler.loads if not any(a <= moment <= b + 60 for a, b in pauses)]
    record["load_mean"] = float(np.mean(loads)) if loads else record["load_before"]
    record["load_max"] = float(np.max(loads)) if loads else record["load_before"]
    record["rss_sampled_mb"], record["cpu_sampled_s"] = sampler.peak_rss_mb, sampler.cpu_s
    record.update(gnu_time(time_file))
    ranks = [re.findall(r"^(\d+)$", p.read_text(), re.MULTILINE) for p in sorted(cache.glob(f"rss_{name}_rank_*"))]
    if ranks and all(ranks):  # MPI: the sum of the ranks' peaks (GNU time on mpirun sees only the largest child)
        record["rss_ranks_mb"] = [int(r[-1]) / 1024 for r in ranks]
        record["rss_mb"] = sum(record["rss_ranks_mb"])
    if not np.isfinite(record["rss_mb"]):  # stopped: the sampled figures (every 2 s)
        record["rss_mb"] = record["rss_sampled_mb"]
        record["user_s"], record["sys_s"] = record["cpu_sampled_s"], 0.0
        record["figures_sampled"] = True
    record["git"] = git_state()
    print(f"    wall {record['wall_s']:.0f} s, peak {record['rss_mb']:.0f} MB, exit {record['returncode']}"
          f"{' (stopped at the time limit)' if record['stopped'] else ''}", flush=True)
    if record["returncode"] != 0 and not record["stopped"]:
        sys.exit(f"{name} failed: see {cache / (name + '.stderr')}")
    (cache / f"timing_{name}.json").write_text(json.dumps(record, indent=1))
    with open(cache / "timing_history.jsonl", "a") as history:  # every timed run, for the repeats
        history.write(json.dumps(record) + "\n")
    return record


def git_state():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--short", "core", "prime_plugin"], cwd=REPO, capture_output=True,
                           text=True).stdout.split()
    return head.strip() + (" + uncommitted " + " ".join(dirty[1::2]) if dirty else "")


def read_pauses(path):
    """[start, end] epoch-second pairs of the periods a run was suspended (the last still open ends now)."""
    if not path.is_file():
        return []
    pauses, start = [], None
    for line in path.read_text().split("\n"):
        if line.startswith("stop "):
            start = float(line.split()[1])
        elif line.startswith("cont ") and start is not None:
            pauses.append([start, float(line.split()[1])])
            start = None
    if start is not None:
        pauses.append([start, time.time()])
    return pauses


def suspend_run(cache, name, resume=False):
    """Suspend (SIGSTOP) or resume (SIGCONT) the process group of the timed run ``name`` in ``cache`` and
    log the moment in CACHE/NAME.pauses, so that its running time leaves the pause out. For measuring
    something else on a shared machine while a long peer run (RELION) is under way."""
    root = int((cache / f"{name}.pgid").read_text())
    # Every process of the run's tree: MPI launchers put their ranks in process groups of their own.
    for pid in process_tree(root):
        try:
            os.kill(pid, signal.SIGCONT if resume else signal.SIGSTOP)
        except ProcessLookupError:
            pass
    with open(cache / f"{name}.pauses", "a") as log:
        log.write(f"{'cont' if resume else 'stop'} {time.time():.1f}\n")


def process_table():
    """{pid: (parent pid, CPU ticks user + system, resident bytes)} of every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]),
                                 int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))
    return table


def process_tree(root, table=None):
    """The pids of ``root`` and all its descendants (``table`` from :func:`process_table`, or read now)."""
    table = process_table() if table is None else table
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier.extend(child for child, row in table.items() if row[0] == pid and child not in tree)
    return sorted(tree)


def _wait_running(process, pause_file, begin, limit_s):
    """Wait for ``process``; raise TimeoutExpired once its running time (pauses left out) passes limit_s."""
    if limit_s is None:
        return process.wait()
    while True:
        paused = sum(end - start for start, end in read_pauses(pause_file))
        left = limit_s - (time.perf_counter() - begin - paused)
        if left <= 0:
            raise subprocess.TimeoutExpired(process.args, limit_s)
        try:
            return process.wait(timeout=min(left, 30.0))
        except subprocess.TimeoutExpired:
            continue


def update_results(section, text):
    """Write ``text`` as the section headed ``section`` of benchmarks/RESULTS.md (replacing the old one)."""
    path = REPO / "benchmarks" / "RESULTS.md"
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(re.escape(section) + r".*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)


def add_relion_pause_arguments(parser):
    """--suspend / --resume: pause a benchmark's running RELION run (a logged pause, left out of its times)."""
    parser.add_argument("--suspend", action="store_true", help="suspend RELION's running run (logged pause)")
    parser.add_argument("--resume", action="store_true", help="resume RELION's suspended run")


# Open MPI refuses 3 ranks on 2 cores without --oversubscribe (RELION's master rank only coordinates).
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3"]


def timed_relion_run(cache, relion_args, limit_min):
    """``relion_refine_mpi`` with ``relion_args`` under MPIRUN in ``cache``, into a fresh Refine3D/, timed by
    :func:`timed_run` as "relion" (stopped after ``limit_min`` minutes of running time); each rank under its
    own GNU time, so that the record's peak memory is the sum of the ranks' peaks."""
    shutil.rmtree(cache / "Refine3D", ignore_errors=True)
    (cache / "Refine3D").mkdir()
    per_rank = ("exec /usr/bin/time -f %M -o rss_relion_rank_$OMPI_COMM_WORLD_RANK relion_refine_mpi "
                + " ".join(relion_args))
    shown = " ".join(MPIRUN) + " relion_refine_mpi " + " ".join(relion_args)
    return timed_run("relion", [*MPIRUN, "sh", "-c", per_rank], shown, cache, limit_s=60 * limit_min)
