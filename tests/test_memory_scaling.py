"""Streaming: peak memory of simulate, reconstruct and refine does not grow with the particle
count beyond the per-particle metadata (images are read and written in chunks, memory-mapped).

Each command runs in its own process and its peak resident set is read from the kernel
(``ru_maxrss`` of that child alone); the same command on four times the particles must stay
within a fixed allowance of the smaller run's peak.
"""

import subprocess
import sys

import mrcfile
import pytest

SMALL, LARGE = 2000, 8000
BOX = 48
# Per-particle metadata (the STAR table in pandas, pose and search state: about 2 KB a
# particle measured) for the 6,000 extra particles, plus allocator noise. Holding the images
# would not fit: they grow by 6000 x 48 x 48 x 4 B = 55 MB from the small set to the large one.
ALLOWANCE_MB = 25

PEAK_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "if done.returncode:\n"
    "    sys.exit(done.stdout[-2000:] + done.stderr[-2000:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def peak_rss_mb(*command, cwd):
    """Peak resident set (MB) of ``prime COMMAND...`` run in a process of its own."""
    prime = [sys.executable, "-m", "prime_plugin.cli", *map(str, command)]
    done = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *prime], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) / 1024


@pytest.fixture(scope="module")
def data_sets(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    with mrcfile.new(folder / "ref.mrc") as mrc:  # the shared map with its pixel size (5 A) in the header
        mrc.set_data(mrcfile.read(shared_data / "ribosome70S_65px.mrc"))
        mrc.voxel_size = 5.0
    peaks = {}
    for n in (SMALL, LARGE):
        peaks[n] = peak_rss_mb("simulate", "--map", "ref.mrc", "--n", n, "--o", f"sim{n}", "--box", BOX,
                               "--rescale_angpix", 6.8, "--snr", 0.1, "--seed", 5, "--shift_px", 2,
                               "--defocus", 1, 3, cwd=folder)
    return folder, peaks


@pytest.mark.slow
def test_simulate_memory_is_flat(data_sets):
    _, peaks = data_sets
    print(f"\nprime simulate peak RSS: {peaks[SMALL]:.0f} MB ({SMALL}) vs {peaks[LARGE]:.0f} MB ({LARGE})")
    assert peaks[LARGE] <= peaks[SMALL] + ALLOWANCE_MB


@pytest.mark.slow
def test_reconstruct_memory_is_flat(data_sets):
    folder, _ = data_sets
    peaks = {n: peak_rss_mb("reconstruct", "--i", f"sim{n}/particles.star", "--o", f"map{n}.mrc", "--ctf", "--j", 2,
                            cwd=folder) for n in (SMALL, LARGE)}
    print(f"\nprime reconstruct peak RSS: {peaks[SMALL]:.0f} MB ({SMALL}) vs {peaks[LARGE]:.0f} MB ({LARGE})")
    assert peaks[LARGE] <= peaks[SMALL] + ALLOWANCE_MB


def test_refine_memory_is_flat(data_sets):
    folder, _ = data_sets
    peaks = {n: peak_rss_mb("refine", "--i", f"sim{n}/particles.star", "--ref", "ref.mrc",
                            "--o", f"refine{n}", "--update_frac", 1.0, "--max_iter", 1, "--nspace", 300, "--j", 2,
                            cwd=folder) for n in (SMALL, LARGE)}
    print(f"\nprime refine peak RSS: {peaks[SMALL]:.0f} MB ({SMALL}) vs {peaks[LARGE]:.0f} MB ({LARGE})")
    assert peaks[LARGE] <= peaks[SMALL] + ALLOWANCE_MB
