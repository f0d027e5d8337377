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


def test_a_full_size_box_256_iteration_stays_within_the_memory_model(tmp_path):
    """One refinement iteration whose working box is the full 256 px box (an alignment limit near
    Nyquist), then the final maps at 256 px: the peak resident set stays within what
    core/memory.refine_bytes predicts for it (the model the refinement refuses to start by)."""
    from importlib.resources import files

    from prime_plugin.core import memory
    from prime_plugin.core.polar import default_n_rot

    box, apix, n_particles, n_space = 256, 0.9, 20, 100
    demo_map = files("prime_plugin") / "data" / "betagal_d2_64.mrc"  # 64 px of 3.6 A
    with mrcfile.new(tmp_path / "ref.mrc") as mrc:
        mrc.set_data(mrcfile.read(demo_map))
        mrc.voxel_size = 3.6
    subprocess.run([sys.executable, "-m", "prime_plugin.cli", "simulate", "--map", "ref.mrc", "--n",
                    str(n_particles), "--o", "sim", "--rescale_angpix", str(apix), "--snr", "0.1", "--seed", "3",
                    "--defocus", "1", "2"], cwd=tmp_path, check=True, capture_output=True, timeout=900)
    peak = peak_rss_mb("refine", "--i", "sim/particles.star", "--ref", "ref.mrc", "--o", "run", "--max_iter", 1,
                       "--update_frac", 1.0, "--nspace", n_space, "--ini_high", 2 * apix, "--j", 2, cwd=tmp_path)
    log = (tmp_path / "run" / "run.log").read_text()
    assert f"at box {box}," in log  # the iteration worked at the full box
    radius_px = 0.9 * box / 2  # the default particle diameter: 90% of the box
    model_mb = sum(memory.refine_bytes(box, n_particles, n_space, default_n_rot(radius_px)).values()) / 2**20
    print(f"\nbox {box} iteration: peak RSS {peak:.0f} MB, model {model_mb:.0f} MB")
    assert peak <= model_mb
