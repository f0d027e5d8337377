"""Shared fixtures: the shared test data folder and RELION's programs as oracles.

RELION-dependent tests skip visibly where RELION is absent. With
``PRIME_REQUIRE_RELION=1`` (set by CI) a missing RELION program is a failure, so CI
can never pass by skipping the cross-checks. The shared data folder
(``../shared/data`` beside the repository, or ``PRIME_SHARED_DATA``) is handled
the same way under ``CI``.

Scipion tests (tests/test_scipion*.py) need scipion-pyworkflow, scipion-em and
scipion-em-relion; they skip visibly without them and fail under
``PRIME_REQUIRE_SCIPION=1`` (CI's Scipion environment). Scipion reads its settings
from the environment when pyworkflow is first imported, so they are set here, before
collection: a throw-away user-data folder, a hosts file, the pwem domain.
"""

import os
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RELION_REQUIRED = os.environ.get("PRIME_REQUIRE_RELION") == "1"
SCIPION_REQUIRED = os.environ.get("PRIME_REQUIRE_SCIPION") == "1"


def pytest_configure(config):
    """Headless Scipion settings (../shared/docs/SCIPION.md), unless the caller set them."""
    import sys
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="prime-scipion-"))
    (home / "user-data" / "projects").mkdir(parents=True)
    hosts = home / "hosts.conf"
    hosts.write_text("[localhost]\nPARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s\n"
                     "NAME = SCIPION_DEFAULT\nMANDATORY = False\nSUBMIT_COMMAND = \n")
    defaults = {"SCIPION_DOMAIN": "pwem", "SCIPION_PYTHON": sys.executable, "SCIPION_HOSTS": str(hosts),
                "SCIPION_USER_DATA": str(home / "user-data"), "SCIPION_TESTS": str(home / "tests"),
                "SCIPION_TEST_NOSYNC": "1", "SCIPION_NOTIFY": "False", "MPLBACKEND": "Agg"}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def _missing(message, required):
    if required:
        pytest.fail(message)
    pytest.skip(message)


def relion_program(name):
    """Path of RELION program ``name``; skips (or fails under PRIME_REQUIRE_RELION=1) if absent."""
    path = shutil.which(name)
    if path is None:
        _missing(f"RELION program {name} not on PATH (apt-get install relion)", RELION_REQUIRED)
    return path


class RelionRunner:
    """Runs RELION programs in a folder, raising with RELION's own output on failure."""

    def __call__(self, program, *args, cwd, timeout=600):
        exe = relion_program(program)
        cmd = [exe, *[str(a) for a in args]]
        done = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout


@pytest.fixture(scope="session")
def relion():
    """Callable ``relion(program, *args, cwd=folder) -> stdout``."""
    return RelionRunner()


@pytest.fixture(scope="session")
def shared_data():
    """The shared test data folder (maps, STAR files, real particles)."""
    folder = Path(os.environ.get("PRIME_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not folder.is_dir():
        _missing(f"shared test data not found at {folder} (set PRIME_SHARED_DATA)", bool(os.environ.get("CI")))
    return folder


@pytest.fixture(scope="session")
def ribosome(shared_data):
    """The shared 70S ribosome map cropped to 64^3 (5 A/px), float32 (z, y, x)."""
    volume = mrcfile.read(shared_data / "ribosome70S_65px.mrc").astype(np.float32)
    return np.ascontiguousarray(volume[:64, :64, :64])


@pytest.fixture(scope="session")
def scipion():
    """Scipion's pwem and scipion-em-relion, importable; skips (fails with PRIME_REQUIRE_SCIPION=1) otherwise."""
    try:
        import pwem  # noqa: F401
        import pyworkflow  # noqa: F401
        import relion  # noqa: F401
    except ImportError as error:
        _missing(f"Scipion not installed ({error}); pip install scipion-pyworkflow scipion-em scipion-em-relion",
                 SCIPION_REQUIRED)
    return pwem
