"""`prime refine` on Dask (--cluster local:N, --scheduler ADDRESS) against the in-process run.

A small simulated data set (box 48, 300 particles, 3 iterations; iteration 1 and 2 each
search one half of the particles from scratch, iteration 3 climbs from the first
search) is refined in this process and on two Dask worker processes; the two must find
the same orientations and maps. A worker killed while it runs a chunk of iteration 2
must not change the result (Dask runs the chunk again). Without dask installed, asking
for it is one line of error. The Dask tests skip visibly where dask is absent.
"""

import os
import signal
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile

from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.execution import check_backend_choice, pairwise_sum
from prime_plugin.core.fourier import fsc
from prime_plugin.core.mrc import write_volume
from prime_plugin.core.refine import RefineParameters, refine
from prime_plugin.core.resample import resample_volume
from prime_plugin.core.simulate import simulate_particles
from test_refine import angular_errors

BOX, N_PARTICLES, SOURCE_PIXEL_A = 48, 300, 5.0
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
KILLED_ITERATION = 2


@pytest.fixture(scope="module")
def dataset(shared_data, tmp_path_factory):
    """300 particles of the 70S ribosome at 6.7 A/px in a 48 px box, SNR 0.5, CTF, origins up to 2 px."""
    folder = tmp_path_factory.mktemp("dask_data")
    source = np.ascontiguousarray(mrcfile.read(shared_data / "ribosome70S_65px.mrc")[:64, :64, :64])
    volume, pixel_A = resample_volume(source, SOURCE_PIXEL_A, SOURCE_PIXEL_A * 64 / BOX, BOX)
    simulate_particles(volume, pixel_A, N_PARTICLES, folder, snr=0.5, seed=4, max_shift_px=2.0,
                       defocus_range_um=(1.0, 2.5))
    write_volume(folder / "start.mrc", volume, pixel_A)
    return folder


def parameters(folder, name, **backend):
    return RefineParameters(str(folder / "particles.star"), str(folder / "start.mrc"), str(folder / name),
                            particle_diameter_A=280, ini_high_A=30, update_fraction=0.5, max_iter=3, n_space=300,
                            seed=5, chunk_size=32, **backend)


@pytest.fixture(scope="module")
def in_process(dataset):
    return refine(parameters(dataset, "in_process"))


@pytest.fixture(scope="module")
def distributed():
    return pytest.importorskip("distributed", reason="dask not installed (pip install \"scipion-em-prime[dask]\")")


@pytest.fixture(scope="module")
def on_local_cluster(dataset, distributed):
    return refine(parameters(dataset, "local_cluster", cluster="local:2"))


def assert_same_refinement(folder, first, second, result):
    """The same orientations (within the angular step for >= 99% of the particles) and the same map."""
    angles = [starfile.read(folder / name / "run_data.star")["particles"][ANGLES].to_numpy() for name in (first, second)]
    agree = angular_errors(*angles) <= result.setup.angular_step_deg
    maps = [mrcfile.read(folder / name / "run_class001.mrc") for name in (first, second)]
    curve = fsc(*maps)
    two_thirds = int(2 / 3 * BOX / 2)
    assert agree.mean() >= 0.99, f"{(~agree).sum()} of {agree.size} particles moved by more than the step"
    assert curve[1:two_thirds + 1].min() >= 0.99, np.round(curve, 4)


def test_local_cluster_reproduces_the_in_process_refinement(dataset, in_process, on_local_cluster):
    assert_same_refinement(dataset, "in_process", "local_cluster", in_process)
    assert [f["iteration"] for f in on_local_cluster.state.history] == [1, 2, 3]
    assert on_local_cluster.resolution_A == pytest.approx(in_process.resolution_A, rel=1e-3)


def kill_worker_once(distributed, marker, iteration):
    """A worker plugin: the worker that starts the first chunk of iteration ``iteration`` kills itself
    (SIGKILL), once for the whole cluster (the marker file, created exclusively, says it happened and
    names the chunk). Defined here, where distributed is known to be importable."""

    class KillWorkerOnce(distributed.WorkerPlugin):
        name = "prime-test-kill-worker-once"

        def transition(self, key, start, finish, **kwargs):
            chunk = str(key)
            if finish != "executing" or not chunk.startswith(f"prime-search-it{iteration:03d}-") or \
                    "-chunk" not in chunk:
                return
            try:
                handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(handle, f"{chunk} {os.getpid()}".encode())
            os.close(handle)
            os.kill(os.getpid(), signal.SIGKILL)

    return KillWorkerOnce()


def test_a_worker_killed_mid_iteration_does_not_change_the_result(dataset, in_process, on_local_cluster,
                                                                  distributed, tmp_path):
    marker = tmp_path / "killed"
    # Two single-threaded worker processes, as --cluster local:2 starts them on this 2-core machine.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env={"NUMBA_NUM_THREADS": "1"}) as cluster, \
            distributed.Client(cluster) as client:
        client.register_plugin(kill_worker_once(distributed, str(marker), KILLED_ITERATION))
        before = set(client.scheduler_info()["workers"])
        result = refine(parameters(dataset, "killed_worker", scheduler=cluster.scheduler_address))
        after = set(client.scheduler_info()["workers"])
    assert marker.exists(), "no worker was killed"
    killed_key, killed_pid = marker.read_text().split()
    assert f"-it{KILLED_ITERATION:03d}-" in killed_key
    assert before - after, "the killed worker is still registered"
    assert [f["iteration"] for f in result.state.history] == [1, 2, 3]
    assert_same_refinement(dataset, "in_process", "killed_worker", in_process)
    # The chunk run again gives what it gave the first time: the same as an undisturbed Dask run.
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc"):
        np.testing.assert_array_equal(mrcfile.read(dataset / "killed_worker" / name),
                                      mrcfile.read(dataset / "local_cluster" / name))


def prime_refine_without_dask(*args, cwd):
    """`prime refine ARGS` in a fresh interpreter in which dask and distributed cannot be imported."""
    blocker = ("import sys; sys.modules['dask'] = None; sys.modules['distributed'] = None; "
               "from prime_plugin.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", blocker, "refine", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("option", [["--cluster", "local:2"], ["--scheduler", "tcp://127.0.0.1:8786"]])
def test_without_dask_the_options_are_one_line_of_error(dataset, tmp_path, option):
    done = prime_refine_without_dask("--i", dataset / "particles.star", "--ref", dataset / "start.mrc",
                                     "--o", tmp_path / "out", "--particle_diameter", "280", *option, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert option[0] in lines[0] and 'pip install "scipion-em-prime[dask]"' in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_the_engine_and_the_command_line_import_no_dask(tmp_path):
    code = ("import sys, prime_plugin.core, prime_plugin.core.execution, prime_plugin.core.refine_tasks, "
            "prime_plugin.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    # Run outside the repository: its prime_plugin/ folder (without core/) would shadow the installed package.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("scheduler, cluster, fragment", [
    ("tcp://10.0.0.5:8786", "local:2", "--scheduler and --cluster exclude each other"),
    (None, "local", "--cluster takes local:N"),
    (None, "local:0", "--cluster takes local:N"),
    (None, "slurm:4", "--cluster takes local:N"),
])
def test_bad_backend_choices_are_refused(scheduler, cluster, fragment):
    with pytest.raises(PrimeInputError, match=fragment):
        check_backend_choice(scheduler, cluster)


def test_partial_sums_are_added_pairwise_in_a_fixed_tree():
    def add(a, b, level, position):
        return f"({a}+{b})"

    assert pairwise_sum(["0"], add) == "0"
    assert pairwise_sum(list("01234"), add) == "(((0+1)+(2+3))+4)"
    assert pairwise_sum(list("0123456"), add) == "(((0+1)+(2+3))+((4+5)+6))"


def test_a_pass_whose_broadcast_data_was_lost_runs_again(distributed, monkeypatch, caplog):
    """When lost workers took data Dask cannot make again, Dask cancels the pass's futures: the backend
    runs the pass again (once here) and returns what an undisturbed pass returns."""
    from prime_plugin.core.execution import DaskBackend, InProcessBackend

    def task(chunk, shared):
        return chunk * shared, np.full(4, float(chunk))

    chunks, groups = list(range(7)), [1, 1, 1, 2, 2, 2, 2]
    expected = InProcessBackend().map_reduce(task, chunks, 10, groups)
    with DaskBackend.start_local(1) as backend:
        real = backend._map_reduce_once
        calls = []

        def lose_the_first_pass(*args):
            calls.append(args[-1])
            if len(calls) == 1:
                raise distributed.client.FutureCancelledError("x-output00001", reason="already forgotten")
            return real(*args)

        monkeypatch.setattr(backend, "_map_reduce_once", lose_the_first_pass)
        with caplog.at_level("WARNING", logger="prime.execution"):
            outputs, totals = backend.map_reduce(task, chunks, 10, groups, name="pass")
    assert calls == ["pass", "pass-attempt2"]
    assert "the pass runs again" in caplog.text
    assert outputs == expected[0]
    assert totals.keys() == expected[1].keys()
    for group in totals:
        np.testing.assert_array_equal(totals[group], expected[1][group])


def test_a_task_that_kills_every_worker_ends_the_run_in_one_line(distributed):
    from prime_plugin.core.errors import PrimeRunError
    from prime_plugin.core.execution import DaskBackend

    def deadly(chunk, shared):
        os.kill(os.getpid(), signal.SIGKILL)

    with DaskBackend.start_local(1) as backend:
        with pytest.raises(PrimeRunError) as raised:
            backend.map_reduce(deadly, [0], None, [1], name="prime-search-it001")
    message = str(raised.value)
    assert "\n" not in message
    # With one worker the broadcast data dies with it: every attempt of the pass is cancelled.
    assert "prime-search-it001" in message and "memory per worker" in message


def test_a_task_dask_gives_up_on_ends_the_run_in_one_line(distributed):
    """Dask's own verdict on a task that kills its workers (KilledWorker), reached here before the
    broadcast data is lost: the memory manager is off, so the second worker keeps its copy, and
    Dask gives up after the first death."""
    import dask

    from prime_plugin.core.errors import PrimeRunError
    from prime_plugin.core.execution import DaskBackend

    def deadly(chunk, shared):
        os.kill(os.getpid(), signal.SIGKILL)

    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.scheduler.active-memory-manager.start": False}):
        with DaskBackend.start_local(2) as backend:
            with pytest.raises(PrimeRunError) as raised:
                backend.map_reduce(deadly, [0], None, [1], name="prime-search-it001")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("a task of prime-search-it001 ended every Dask worker that ran it")
