"""Run independent tiles of small BLAS/FFT work on one pipeline per thread.

Small matrix products and short FFT batches lose much of their time to the
libraries' own thread start-up and synchronisation. Running the tiles on a pool of
Python threads (numpy and scipy.fft release the GIL) with the BLAS limited to one
thread keeps every core busy without that overhead. The pool has as many threads as
numba is set to use (``--j``), so one setting governs the whole engine. Tiles started
from inside a tile run serially in that tile's thread.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numba

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
    with _blas_controller().limit(limits=1, user_api="blas"):
        return list(pool.map(lambda item: _run_marked(work, item), items))
