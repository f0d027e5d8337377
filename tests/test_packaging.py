"""Installation: the wheel's contents, `pip install .` and `pip install -e .` in fresh
environments without Scipion, and the `prime` command's entry points."""

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from prime_plugin.cli import main as prime

REPO = Path(__file__).resolve().parents[1]


def run(*cmd, cwd):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def fresh_env(folder):
    """A new virtual environment that sees this interpreter's packages (numpy...) but neither the
    project nor Scipion.

    The outer packages are offered through a folder of links that leaves out every
    installed copy of this project, so the fresh install is the one imported, and Scipion's
    packages, so the test holds in CI's Scipion environment too.
    """
    run(sys.executable, "-m", "venv", folder, cwd=folder.parent)
    outer = Path(sysconfig.get_paths()["purelib"])
    view = folder / "outer-packages"
    view.mkdir()
    for entry in outer.iterdir():
        if not entry.name.startswith(("prime_plugin", "scipion_", "__editable__", "pwem", "pyworkflow", "relion")):
            (view / entry.name).symlink_to(entry)
    site = next((folder / "lib").glob("python*/site-packages"))
    (site / "outer.pth").write_text(f"{view}\n")
    return folder / "bin"


def test_wheel_ships_engine_protocols_and_templates(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, REPO, cwd=tmp_path)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    for expected in ("prime_plugin/core/star.py", "prime_plugin/core/ctf.py", "prime_plugin/protocols/__init__.py",
                     "prime_plugin/templates/README.md", "prime_plugin/cli/__init__.py",
                     "prime_plugin/data/betagal_d2_64.mrc", "prime_plugin/templates/prime_refine.json.template",
                     "prime_plugin/protocols/protocol_refine3d.py", "prime_plugin/protocols.conf",
                     "prime_plugin/convert.py", "prime_plugin/viewers.py", "prime_plugin/bibtex.py"):
        assert expected in names
    assert not [n for n in names if n.startswith(("core/", "protocols/", "tests/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).read(entry_points).decode()
    assert "[pyworkflow.plugin]" in text and "prime_plugin = prime_plugin" in text


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_install_and_import_without_scipion(tmp_path, editable):
    bin_dir = fresh_env(tmp_path / "env")
    target = ["-e", REPO] if editable else [REPO]
    run(bin_dir / "pip", "install", "--no-deps", "-q", *target, cwd=tmp_path)
    code = ("import importlib.util, prime_plugin.core as c, prime_plugin.protocols;"
            "assert importlib.util.find_spec('pwem') is None;"
            "print(c.__file__); print(c.symmetry_operators('D2').shape)")
    out = run(bin_dir / "python", "-c", code, cwd=tmp_path).split()
    location = Path(out[0])
    assert (location == REPO / "core" / "__init__.py") if editable else ("site-packages" in location.parts)
    assert out[1:] == ["(4,", "3,", "3)"]
    assert run(bin_dir / "prime", "--version", cwd=tmp_path).strip().startswith("prime ")


def test_symmetry_command_prints_the_operators_as_json(capsys):
    assert prime(["symmetry", "--sym", "D2"]) == 0
    matrices = json.loads(capsys.readouterr().out)
    assert len(matrices) == 4 and all(len(m) == 3 and len(m[0]) == 3 for m in matrices)
    assert [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] in matrices


def test_demo_refuses_too_few_particles(tmp_path, capsys):
    assert prime(["demo", "--n", "50", "--o", str(tmp_path / "demo")]) == 2
    assert "--n must be at least 200" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_refines_to_near_nyquist(tmp_path, capsys):
    """The README's first command: the shipped map, simulated and refined (about 2 minutes)."""
    assert prime(["demo", "--o", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    resolution = float(printed.split("gold-standard resolution ")[1].split(" A")[0])
    error = float(printed.split("truth ")[1].split(" degrees")[0])
    assert resolution < 9.0 and error < 3.0, printed
    for name in ("run_class001.mrc", "run_data.star", "fsc.png", "angdist.png", "convergence.png", "run.log"):
        assert (tmp_path / "demo" / "Refine" / name).stat().st_size > 0


def test_every_command_has_help(capsys):
    from prime_plugin.cli import COMMANDS, command_name

    for module in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            prime([command_name(module), "--help"])
        assert stop.value.code == 0
        assert module.__doc__.strip().splitlines()[0] in capsys.readouterr().out
