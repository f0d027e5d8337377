"""Outputs that appear whole or not at all: write under a temporary name, then rename.

Every file the engine writes (STAR files, maps, stacks, checkpoints) goes through
here, so a crash or a bad input never leaves a half-written output, and the final
file gets the ordinary permissions of a new file (the umask's), not mkstemp's 0600.
"""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def temporary_beside(path):
    """A fresh, empty hidden file in ``path``'s folder, with a new file's default permissions."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


@contextmanager
def atomic_output(path):
    """Yield a temporary path to write; on success it is renamed to ``path``, on error removed."""
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomically(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(text)
