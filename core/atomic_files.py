"""Outputs that appear whole or not at all: write under a temporary name, then rename.

Every file the engine writes (STAR files, maps, stacks, checkpoints) goes through
here, so a crash or a bad input never leaves a half-written output, and the final
file gets the ordinary permissions of a new file (the umask's), not mkstemp's 0600.
An error while writing (a full disk...) names the file being written, not its
temporary name. A process killed while writing leaves its temporary behind:
:func:`temporary_target` recognises one (``.NAME.XXXXXXXX.tmp``), so that the next
run can remove the leftovers of its own outputs.
"""

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

# The temporaries of temporary_beside (".NAME.<8 random characters>.tmp"; ".npz" from earlier versions).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.(tmp|npz)$")


def temporary_target(name):
    """The file name a temporary of :func:`temporary_beside` stands for, or None if ``name`` is not one."""
    found = _TEMPORARY.match(Path(name).name)
    return None if found is None else found.group("name")


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
    """Yield a temporary path to write; on success it is renamed to ``path``, on error removed.

    An OSError that names no file, or the temporary, is raised again naming ``path``."""
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        if error.errno is None or error.filename not in (None, str(temporary), temporary):
            raise
        raise type(error)(error.errno, error.strerror, str(path)) from error
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomically(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(text)
