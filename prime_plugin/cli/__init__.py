"""The ``prime`` command: one subcommand per module, each thin over a core call.

Every subcommand module has a docstring (its help text), ``add_args(parser)`` and
``main(args) -> int``, and may name the engine's parameters in its own words
(``PARAMETER_NAMES``, e.g. ``{"n_space": "--nspace"}``) for the engine's messages. Bad
input (:class:`PrimeInputError`, or options argparse refuses) or an unwritable output
becomes one line on stderr and exit status 2, a run that cannot go on
(:class:`PrimeRunError`, or memory running out) one line and status 1, never a
traceback; Ctrl-C ends with status 130 and SIGTERM, which a batch scheduler sends, with
143, both after the same clean-up (``options.EXIT_STATUSES``, in every --help).
"""

import argparse
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from prime_plugin.cli import (align_symmetry, benchmark, check, convert_star, demo, mask, postprocess, reconstruct,
                              refine, simulate, symmetry)
from prime_plugin.cli.options import EXIT_STATUSES
from prime_plugin.core.errors import PrimeInputError, PrimeRunError
from prime_plugin.version import __version__

COMMANDS = [demo, refine, check, convert_star, symmetry, align_symmetry, simulate, reconstruct, mask, postprocess,
            benchmark]
PARAMETER_NAMES = {"pixel_size_A": "--angpix"}  # every command's; a command's own PARAMETER_NAMES add to them


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that a run stops the same clean way."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its refusals in one line like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_name(module):
    """``prime_plugin.cli.convert_star`` -> ``convert-star``."""
    return module.__name__.rsplit(".", 1)[-1].replace("_", "-")


def build_parser():
    parser = _Parser(
        prog="prime",
        description="PRIME / stochastic hill climbing cryo-EM 3D refinement with RELION-compatible files.",
        epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"prime {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        doc = module.__doc__.strip()
        name = command_name(module)
        # RELION's programs are spelled with underscores (relion_align_symmetry): that spelling works too.
        aliases = [name.replace("-", "_")] if "-" in name else []
        sub = commands.add_parser(name, aliases=aliases, help=doc.splitlines()[0], description=doc,
                                  epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(sub)
        sub.set_defaults(run=module.main, module=module)
    return parser


def _terminate(signum, frame):
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` while the command runs (in the main thread; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _file_named(error):
    """The file an OSError is about, as the user knows it (an atomic write's target, not its temporary)."""
    from prime_plugin.core.atomic_files import temporary_target

    name = error.filename
    if name is None:
        return None
    target = temporary_target(name)
    return str(Path(name).with_name(target)) if target else str(name)


def main(argv=None):
    parser = build_parser()
    with _sigterm_as_interrupt(), warnings.catch_warnings():
        # mrcfile's remarks on a file's header: the engine says in one line what is wrong with a file it refuses.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"mrcfile(\.|$)")
        args = parser.parse_args(argv)  # SystemExit after --help, --version or a refused option (one line)
        if args.command is None:
            parser.print_help()
            return 2
        return _run(args)


def _run(args):
    prefix = f"prime {args.command}: "
    try:
        return args.run(args) or 0
    except PrimeInputError as error:
        names = {**PARAMETER_NAMES, **getattr(args.module, "PARAMETER_NAMES", {})}
        print(f"{prefix}error: {error.reworded(names)}", file=sys.stderr)
        return 2
    except PrimeRunError as error:
        print(f"{prefix}error: {error}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{prefix}error: out of memory (this machine could not give the memory the run asked for)",
              file=sys.stderr)
        return 1
    except OSError as error:
        name, problem = _file_named(error), error.strerror or str(error)
        print(f"{prefix}error: {name}: {problem}" if name else f"{prefix}error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"{prefix}{'stopped by SIGTERM' if terminated else 'interrupted'}{getattr(stop, 'hint', '')}",
              file=sys.stderr)
        return 143 if terminated else 130
