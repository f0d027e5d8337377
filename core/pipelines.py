"""Run independent tiles of small BLAS/FFT work on one pipeline per thread.

Small matrix products and short FFT batches lose much of their time to the
libraries' own thread start-up and synchronisation. Running the tiles on a pool of
Python threads (numpy and scipy.fft release the GIL) with the BLAS limited to one
thread keeps every core busy without that overhead. The pool has as many threads as
numba is set to use (``--j``), so one setting governs the whole engine
(:class:`thread_limit` applies it to numba and scipy.fft). Tiles started from inside a
tile run serially in that tile's thread.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import scipy.fft
from prime_plugin.core.errors import PrimeInputError

_pools = {}
_controller = []
_inside = threading.local()


def _blas_controller():
    from threadpoolctl import ThreadpoolController

    if not _controller:
        _controller.append(ThreadpoolController())
    return _controller[0]


def _run_marked(work, item):
    _inside.active = True
    try:
        return work(item)
    finally:
        _inside.active = False


def map_tiles(work, items):
    """[work(item) for item in items], on the pipeline pool when more than one thread is allowed."""
    items = list(items)
    threads = min(numba.get_num_threads(), len(items))
    if threads <= 1 or getattr(_inside, "active", False):
        return [work(item) for item in items]
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prime-tile")
    with single_threaded_blas():
        return list(pool.map(lambda item: _run_marked(work, item), items))


def single_threaded_blas():
    """Context: the BLAS on one thread. For many tiny problems in a row (a 2-parameter L-BFGS-B per
    particle: scipy's calls the BLAS for vectors of 2, and on a busy machine the BLAS threads' wake-up
    and synchronisation made each call about ten times slower, 48 instead of 4 ms)."""
    return _blas_controller().limit(limits=1, user_api="blas")


class thread_limit:
    """Context: numba and scipy.fft use ``threads`` threads (all when None), restored on exit (``--j``)."""

    def __init__(self, threads):
        if threads is not None and threads < 1:
            raise PrimeInputError(f"--j must be at least 1, got {threads}")
        self.threads = None if threads is None else min(int(threads), numba.config.NUMBA_NUM_THREADS)

    def __enter__(self):
        self._numba_before = numba.get_num_threads()
        self._scipy = scipy.fft.set_workers(self.threads or -1)
        self._scipy.__enter__()
        if self.threads is not None:
            numba.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        numba.set_num_threads(self._numba_before)
        self._scipy.__exit__(*exc)
