"""What a refinement was started with, kept beside its checkpoint, so that a continuation can be checked.

A run records, when it starts, a fingerprint of its inputs in the checkpoint folder
(``inputs.json``): the SHA-256 of the particle STAR file's bytes, of the reference map's
and of the solvent mask's, and every field of
:class:`~prime_plugin.core.refine.RefineParameters` except those that do not change the
result (:data:`NOT_COMPARED`: where and how fast the work runs, how many iterations at
most, and the paths, whose contents are compared instead). A field added to the
parameters later is compared without changing this module. Continuing compares the
current inputs with the record and refuses, in one line, at the first that differs.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

from prime_plugin.core.atomic_files import write_text_atomically
from prime_plugin.core.errors import PrimeInputError

__all__ = ["RECORD_NAME", "NOT_COMPARED", "InputsDiffer", "fingerprint", "record_inputs", "check_inputs"]

RECORD_NAME = "inputs.json"
# Files compared by content: parameter -> what the message calls it.
FILES = {"particles": "particle STAR file", "reference": "starting map", "solvent_mask": "mask"}
# Fields that do not change the result (or, for the files, are compared by content).
NOT_COMPARED = frozenset({"output_dir", "threads", "scheduler", "cluster", "max_iter", "chunk_size"} | set(FILES))


ADVICE = "continue it with the same inputs, or start a new run"


class InputsDiffer(PrimeInputError):
    """A continuation whose input ``parameter`` differs: ``given`` now, ``recorded`` when the run started.

    ``difference`` is the message without its advice (ADVICE), for front ends that give their own."""

    def __init__(self, difference, parameter, given, recorded):
        super().__init__(f"{difference}; {ADVICE}", parameter=parameter)
        self.difference = difference
        self.given = given
        self.recorded = recorded


def file_hash(path):
    """SHA-256 (hex) of the bytes of ``path``, or None for no file."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _comparable(name, value):
    """``value`` as JSON would give it back (so that recorded and current values compare alike)."""
    if name == "symmetry" and isinstance(value, str):
        value = value.strip().upper()
    return json.loads(json.dumps(value, default=repr))


def fingerprint(params):
    """{parameter: value or file hash} of everything in ``params`` that changes the result (module docstring)."""
    values = {name: file_hash(getattr(params, name, None)) for name in FILES}
    for field in dataclasses.fields(params):
        if field.name not in NOT_COMPARED:
            values[field.name] = _comparable(field.name, getattr(params, field.name))
    return values


def record_inputs(values, folder):
    """Write a :func:`fingerprint` into ``folder`` (made if needed), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / RECORD_NAME, json.dumps(values, indent=1, sort_keys=True) + "\n")


def check_inputs(params, folder, run_folder):
    """Refuse (:class:`InputsDiffer`) to continue the run in ``run_folder`` with inputs other than those
    recorded in its checkpoint ``folder``. A checkpoint without a record, and parameters the record
    lacks (both from earlier versions of the engine), are not checked."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrimeInputError(f"unreadable record of the run's inputs ({exc})", path) from None
    current = fingerprint(params)
    for name, value in current.items():
        if name not in recorded:
            continue  # a parameter added to the engine since the run started
        then = recorded[name]
        if value == then:
            continue
        if name not in FILES:
            difference = f"{name} is {_shown(value)} here but was {_shown(then)} when the run in {run_folder} started"
        elif then is None or value is None:
            difference = (f"{name}: a {FILES[name]} is {'given' if value else 'not given'} here but "
                          f"{'was' if then else 'was not'} when the run in {run_folder} started")
        else:
            difference = (f"{name}: the {FILES[name]}'s content differs from the one the run in {run_folder} "
                          "started with")
        raise InputsDiffer(difference, name, value, then)


def _shown(value):
    return "not set" if value is None else repr(value)
