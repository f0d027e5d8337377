"""What the benchmark scripts share: finding ``prime``, running a checked command, and a
background sampler thread (the scripts run as ``python benchmarks/bench_*.py``, so this
folder is on their import path)."""

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path


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
