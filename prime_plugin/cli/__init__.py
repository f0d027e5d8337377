"""The ``prime`` command: one subcommand per module, each thin over a core call.

Every subcommand module has a docstring (its help text), ``add_args(parser)`` and
``main(args) -> int``. Bad input (:class:`PrimeInputError`) or an unwritable
output becomes one line on stderr and exit status 2, a run that cannot go on
(:class:`PrimeRunError`) one line and status 1, never a traceback.
"""

import argparse
import sys

from prime_plugin.cli import benchmark, check, convert_star, demo, reconstruct, refine, simulate, symmetry
from prime_plugin.core.errors import PrimeInputError, PrimeRunError
from prime_plugin.version import __version__

COMMANDS = [demo, refine, check, convert_star, symmetry, simulate, reconstruct, benchmark]


def command_name(module):
    """``prime_plugin.cli.convert_star`` -> ``convert-star``."""
    return module.__name__.rsplit(".", 1)[-1].replace("_", "-")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="prime",
        description="PRIME / stochastic hill climbing cryo-EM 3D refinement with RELION-compatible files.",
    )
    parser.add_argument("--version", action="version", version=f"prime {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        doc = module.__doc__.strip()
        sub = commands.add_parser(command_name(module), help=doc.splitlines()[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(sub)
        sub.set_defaults(run=module.main)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except PrimeInputError as error:
        print(f"prime {args.command}: error: {error}", file=sys.stderr)
        return 2
    except PrimeRunError as error:
        print(f"prime {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"prime {args.command}: error: {error.strerror or error}: {error.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prime {args.command}: interrupted", file=sys.stderr)
        return 130

