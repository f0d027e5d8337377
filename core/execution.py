"""Where the refinement's units of work run: in this process, or on a Dask distributed cluster.

The engine cuts each pass over the particles into chunks. A task, a plain top-level
function ``task(chunk, shared) -> (output, partial)``, turns one chunk into a small
per-particle output and partial sums; the partial sums of the chunks of one group
(a half-set) are added up. Partial sums are objects that add with ``+`` (a new
object) and ``+=`` (in place), like numpy arrays or
:class:`~prime_plugin.core.reconstruct.FourierSums`. A backend runs the tasks and the
additions, through one method, :meth:`map_reduce`, and is closed at the end (a
context manager):

- :class:`InProcessBackend` (the default): the tasks one after the other in this
  process, each using this process's threads (numba, the pipeline pool); each
  group's partial sums are added in chunk order, in place, into one running total as
  the chunks finish, so memory holds one total per group and one partial.
- :class:`DaskBackend`: the tasks on the workers of a Dask distributed cluster,
  either one already running (``--scheduler ADDRESS``) or worker processes started
  here (``--cluster local:N``). The shared data is broadcast to every worker once per
  pass, every task is submitted with retries (a chunk whose worker is lost runs
  again, with the same result, since the chunk carries its own random seed), and the
  partial sums are added pairwise with ``+`` in a tree on the workers (never in place:
  an input Dask may need again must stay as it was); only the totals and the
  per-particle outputs come back.

Each backend's result depends only on the chunks (and, to float32 rounding, on the
threads each task uses and, for Dask, on the wave size, two chunks per worker), never
on the workers' timing. The two
backends add the partial sums in different orders (a tree spreads the additions over
the workers; a running total keeps this process's memory flat), so their sums agree to
float32 rounding.

This module holds no numerics. It imports dask only when a Dask backend is made, so
the engine works without the optional ``dask`` extra.
"""

import logging
import operator
import os
import time
import uuid

from prime_plugin.core.errors import PrimeInputError, PrimeRunError

log = logging.getLogger("prime.execution")

TASK_RETRIES = 2  # times Dask runs a failed task again (a lost worker's tasks are re-run regardless)
PASS_ATTEMPTS = 3  # times a pass is run when lost workers took data it cannot make again
CONNECT_TIMEOUT_S = 30
DASK_EXTRA_HINT = 'pip install "scipion-em-prime[dask]"'


def check_backend_choice(scheduler=None, cluster=None):
    """Refuse a bad choice of backend in the command line's words, before anything runs.

    scheduler : address of a running Dask scheduler (``--scheduler``), or None.
    cluster : ``"local:N"``, N >= 1 worker processes on this computer (``--cluster``), or None.
    """
    if scheduler and cluster:
        raise PrimeInputError("--scheduler and --cluster exclude each other: give one of them")
    if cluster:
        local_worker_count(cluster)


def local_worker_count(cluster):
    """N of ``"local:N"`` (worker processes on this computer); PrimeInputError for anything else."""
    kind, _, count = str(cluster).strip().partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise PrimeInputError(f"--cluster takes local:N, N >= 1 worker processes on this computer; got {cluster!r}")
    return int(count)


def make_backend(scheduler=None, cluster=None):
    """The backend the options ask for: in-process by default, else Dask (see module docstring).

    Raises PrimeInputError (one line) for a bad choice, when dask is not installed, or
    when the scheduler cannot be reached or its workers cannot run prime.
    """
    check_backend_choice(scheduler, cluster)
    if scheduler:
        return DaskBackend.connect(scheduler)
    if cluster:
        return DaskBackend.start_local(local_worker_count(cluster))
    return InProcessBackend()


def pairwise_sum(values, add):
    """Sum of ``values`` added pairwise, level by level: ((v0 + v1) + (v2 + v3)) + v4 for five values.

    add(a, b, level, position) returns a + b; level counts from 0 at the leaves and
    position is the pair's place within its level (for naming). An odd value out at the
    end of a level moves up unchanged. The shape depends only on the number of values.
    """
    level = list(values)
    if not level:
        raise ValueError("pairwise_sum needs at least one value")
    depth = 0
    while len(level) > 1:
        paired = [add(level[i], level[i + 1], depth, i // 2) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
        depth += 1
    return level[0]


class InProcessBackend:
    """Runs the tasks in this process, one after the other (each task uses this process's threads)."""

    description = "this process"
    threads_per_task = None  # the tasks inherit the caller's thread settings

    def map_reduce(self, task, chunks, shared, groups, name="prime"):
        """Run ``task(chunk, shared) -> (output, partial)`` for every chunk and add up the partials by group.

        groups[i] : the group of chunk i. name : a label (the Dask backend names its tasks with it).
        Returns (the outputs in chunk order, {group: sum of its chunks' partials}); a group
        with no chunks is absent. Here each partial is added into its group's total (the
        first partial of the group) in place, as the chunks finish in order.
        """
        outputs, totals = [], {}
        for chunk, group in zip(chunks, groups):
            output, partial = task(chunk, shared)
            outputs.append(output)
            if group in totals:
                totals[group] += partial
            else:
                totals[group] = partial
            del partial
        return outputs, totals

    def close(self):
        """Nothing to release."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DaskBackend:
    """Runs the tasks on a Dask distributed cluster (see module docstring).

    client : a ``distributed.Client``; cluster : the ``LocalCluster`` this backend started
    (closed with it), or None for a cluster run by someone else; threads_per_task : the
    threads each task may use (None: the worker process's own settings).
    """

    def __init__(self, client, cluster=None, threads_per_task=None, description="a Dask cluster"):
        self.client = client
        self.cluster = cluster
        self.threads_per_task = threads_per_task
        self.description = description
        self._run = uuid.uuid4().hex[:8]  # task names are unique per run on a shared scheduler

    @classmethod
    def connect(cls, address):
        """A backend on the running Dask scheduler at ``address`` (e.g. tcp://10.0.0.5:8786).

        Each task uses its worker process's thread settings (numba: every core of the machine
        unless NUMBA_NUM_THREADS says otherwise), which suits one single-threaded worker per machine.
        """
        distributed = _import_distributed("--scheduler")
        try:
            client = distributed.Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise PrimeInputError(f"cannot reach the Dask scheduler at {address} ({_one_line(exc)})") from None
        backend = cls(client, description=f"the Dask cluster at {address}")
        backend._check_workers_run_prime()
        return backend

    @classmethod
    def start_local(cls, workers):
        """A backend on ``workers`` Dask worker processes started on this computer (1 thread each)."""
        distributed = _import_distributed("--cluster")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # The workers' own logs stay quiet: a failed task's error reaches this process anyway
        # (one line at the command line), and a restarted worker is the cluster's business.
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.CRITICAL)
        try:
            client = distributed.Client(cluster)
        except BaseException:
            cluster.close()
            raise
        return cls(client, cluster, threads_per_task=max(1, cores // workers),
                   description=f"{workers} Dask worker processes on this computer")

    def _check_workers_run_prime(self):
        """Refuse workers that cannot import prime or run another version of it."""
        from prime_plugin.version import __version__

        try:
            versions = self.client.run(_prime_version)
        except Exception as exc:  # the workers' own failure, whatever it is, becomes one line
            self.close()
            raise PrimeInputError(f"the Dask workers cannot run prime ({_one_line(exc)}): install "
                                  f"scipion-em-prime {__version__} in their environment") from None
        others = {worker: version for worker, version in versions.items() if version != __version__}
        if others:
            self.close()
            worker, version = next(iter(others.items()))
            raise PrimeInputError(f"the Dask worker {worker} runs prime {version}, this is prime {__version__}: "
                                  f"install the same version on every worker")

    def map_reduce(self, task, chunks, shared, groups, name="prime"):
        """As :meth:`InProcessBackend.map_reduce`, on the workers: ``shared`` broadcast once, the tasks
        submitted with retries, each group's partials added pairwise in a tree on the workers.

        The chunks go in waves of :meth:`wave_size` chunks; a wave's partial sums are added up
        (a tree per group, then into the group's running total) before the wave after next is
        submitted, so the partial sums held on the workers do not grow with the particle count.

        A lost worker's tasks run again on the others. If it took with it data that cannot be
        made again (the broadcast ``shared``, when Dask's memory manager had trimmed it to the
        one copy on that worker), Dask cancels what depends on it; the whole pass then runs
        again, up to PASS_ATTEMPTS times, with the same result (the chunks carry their seeds).
        A task that kills its workers again and again (Dask's KilledWorker, e.g. out of
        memory) ends the run with a one-line :class:`PrimeRunError`.
        """
        from concurrent.futures import CancelledError

        import distributed  # importable: this backend was made with it
        for attempt in range(1, PASS_ATTEMPTS + 1):
            try:
                return self._map_reduce_once(task, chunks, shared, groups,
                                             name if attempt == 1 else f"{name}-attempt{attempt}")
            except CancelledError as lost:
                if attempt == PASS_ATTEMPTS:
                    raise PrimeRunError(f"Dask workers died during {name} {PASS_ATTEMPTS} times over, each time "
                                        f"with data the pass needs (often: too little memory per worker); "
                                        f"the last time: {_one_line(lost)}") from None
                log.warning(f"A Dask worker was lost with data {name} needs; the pass runs again.")
            except distributed.KilledWorker as killed:
                raise PrimeRunError(f"a task of {name} ended every Dask worker that ran it (often: too little "
                                    f"memory per worker): {_one_line(killed)}") from None

    def _map_reduce_once(self, task, chunks, shared, groups, name):
        client = self.client
        tag = f"{name}-{self._run}"
        shared_on_workers = client.scatter(shared, broadcast=True, hash=False)
        wave = self.wave_size()
        outputs, totals, pending = [], {}, []
        for start in range(0, len(chunks), wave):
            stop = min(start + wave, len(chunks))
            results = [client.submit(task, chunks[i], shared_on_workers, key=f"{tag}-chunk{i:05d}",
                                     retries=TASK_RETRIES) for i in range(start, stop)]
            outputs += [client.submit(operator.getitem, result, 0, key=f"{tag}-output{i:05d}", retries=TASK_RETRIES)
                        for i, result in zip(range(start, stop), results)]
            for group in dict.fromkeys(groups[start:stop]):
                partials = [client.submit(operator.getitem, result, 1, key=f"{tag}-partial{i:05d}",
                                          retries=TASK_RETRIES)
                            for i, result in zip(range(start, stop), results) if groups[i] == group]

                def add_on_workers(a, b, level, position, group=group, start=start):
                    return client.submit(operator.add, a, b, retries=TASK_RETRIES,
                                         key=f"{tag}-sum{group}-from{start:05d}-level{level}-{position:05d}")

                wave_total = pairwise_sum(partials, add_on_workers)
                totals[group] = wave_total if group not in totals else client.submit(
                    operator.add, totals[group], wave_total, key=f"{tag}-sum{group}-upto{stop:05d}",
                    retries=TASK_RETRIES)
            del results  # each chunk's whole result is dropped once its output and partial are taken
            pending.append(list(totals.values()))
            if len(pending) > 2:  # one wave computing while the one before is added up
                _wait_for(pending.pop(0))
        # shared_on_workers stays referenced until the totals are back: broadcast data cannot be
        # recomputed, and a chunk whose worker is lost before its partial sums are added runs again.
        _wait_for(outputs + list(totals.values()))
        return client.gather(outputs), client.gather(totals)

    def wave_size(self):
        """Chunks submitted per wave: two per worker (at least 4), so that at most about four
        partial sums per worker exist at any time (one grid of (2 box)^2 (box + 1) complex64 and
        float32 values each: 12.8 MB at box 64, 0.8 GB at box 256).

        The order of the additions depends only on the chunks and this size (the same after a
        lost worker is replaced).
        """
        workers = len(self.client.scheduler_info().get("workers", {}))
        return max(4, 2 * workers)

    def close(self):
        """Disconnect from the scheduler; stop the local cluster if this backend started it."""
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wait_for(futures, poll_s=0.1):
    """Wait until every future is finished (or failed) by polling their state here.

    An interruption (Ctrl-C) then lands in this thread's sleep, not inside the client's
    event loop, where it would leave unfinished waits to be reported as tracebacks.
    """
    while not all(future.done() for future in futures):
        time.sleep(poll_s)


def _import_distributed(option):
    try:
        import distributed
    except ImportError:
        raise PrimeInputError(f"{option} needs Dask, an optional extra of prime: {DASK_EXTRA_HINT}") from None
    return distributed


def _prime_version():
    """The prime version a worker imports (run on the workers)."""
    from prime_plugin.version import __version__

    return __version__


def _one_line(exc):
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
