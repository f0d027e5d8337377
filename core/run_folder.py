"""A refinement's output folder: the files a run writes, what it holds, and its preparation at the start.

A run writes run.log, the per-iteration files run_itNNN_*, the final outputs (run_data.star,
run_model.star, run_posterior.star, run_convergence.star, run_class001.mrc, the half maps,
the three plots) and the checkpoint folder ``.checkpoint`` (its state, the Fourier sums and
``inputs.json``, :mod:`~prime_plugin.core.run_inputs`). Files are written atomically; a
process killed while writing leaves a temporary ``.NAME.XXXXXXXX.tmp`` behind.

:func:`begin_run` prepares the folder once the inputs are checked, before anything else is
written: a new run removes every file an earlier run wrote there (and only those) and records
its inputs; a continuation checks that the folder holds a complete iteration and that the
inputs are those recorded, and removes the temporaries of the interrupted run. A run that
fails or is stopped before its first complete iteration leaves nothing that a new run does
not clear.
"""

import shutil
from fnmatch import fnmatch
from pathlib import Path

from prime_plugin.core.atomic_files import temporary_target
from prime_plugin.core.errors import PrimeInputError

__all__ = ["RUN_LOG", "RESULT_PATTERNS", "checkpoint_folder", "has_complete_iteration", "results", "holds_run",
           "remove_temporaries", "clear", "begin_run"]

RUN_LOG = "run.log"
RESULT_PATTERNS = ("run_it[0-9][0-9][0-9]*_*", "run_data.star", "run_model.star", "run_posterior.star",
                   "run_convergence.star", "run_class001.mrc", "run_half[12]_class001_unfil.mrc", "fsc.png",
                   "angdist.png", "convergence.png")


def checkpoint_folder(folder):
    """The checkpoint folder of the run in ``folder``."""
    from prime_plugin.core.refine import CHECKPOINTS

    return Path(folder) / CHECKPOINTS


def has_complete_iteration(folder):
    """True when ``folder`` holds the checkpoint of a complete iteration (a run can continue from it)."""
    from prime_plugin.core.refine_state import STATE_NAME

    return (checkpoint_folder(folder) / STATE_NAME).is_file()


def _is_result(name):
    return any(fnmatch(name, pattern) for pattern in RESULT_PATTERNS)


def results(folder):
    """The result files (per-iteration and final outputs) a run wrote in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_result(p.name))


def holds_run(folder):
    """True when ``folder`` holds a run that a new one would overwrite: results, the checkpoint of a
    complete iteration, or a run.log without the record of the inputs that every run of this version
    writes before its log (a run of an earlier version, or a run still starting, cannot be told apart
    from a failed start without it). Only a run that stopped before its first complete iteration
    leaves a folder for which this is False."""
    from prime_plugin.core.run_inputs import RECORD_NAME

    folder = Path(folder)
    log_without_record = (folder / RUN_LOG).exists() and not (checkpoint_folder(folder) / RECORD_NAME).exists()
    return has_complete_iteration(folder) or bool(results(folder)) or log_without_record


def _temporaries(folder):
    """Leftover temporaries of the run's own files in ``folder`` and its checkpoint folder."""
    found = []
    for where, own in ((Path(folder), _is_result), (checkpoint_folder(folder), lambda name: True)):
        for path in where.iterdir() if where.is_dir() else ():
            target = temporary_target(path.name)
            if target and path.is_file() and own(target):
                found.append(path)
    return found


def remove_temporaries(folder):
    """Remove the temporaries that killed runs left in ``folder`` (only those of the run's own files)."""
    for path in _temporaries(folder):
        path.unlink(missing_ok=True)


def clear(folder):
    """Remove every file a run wrote in ``folder``: results, run.log, checkpoints, temporaries; nothing else."""
    folder = Path(folder)
    for path in results(folder) + _temporaries(folder):
        path.unlink(missing_ok=True)
    (folder / RUN_LOG).unlink(missing_ok=True)
    shutil.rmtree(checkpoint_folder(folder), ignore_errors=True)


def begin_run(params, resume):
    """Prepare ``params.output_dir`` for a run (module docstring); raises PrimeInputError, having
    changed nothing, when a continuation is not possible."""
    from prime_plugin.core.run_inputs import check_inputs, fingerprint, record_inputs

    out = Path(params.output_dir)
    if resume:
        if not has_complete_iteration(out):
            raise PrimeInputError("holds no complete iteration to continue from; start the run again instead "
                                  "(without continuing)", out)
        check_inputs(params, checkpoint_folder(out), out)
        remove_temporaries(out)
    else:
        values = fingerprint(params)  # before clearing: an input may be an earlier run's output
        clear(out)
        record_inputs(values, checkpoint_folder(out))
