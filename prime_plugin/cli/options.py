"""Option types shared by the subcommands, and the exit statuses every command's help lists."""

import argparse
import math

EXIT_STATUSES = """exit status:
  0    done
  1    the run could not go on for a reason outside the input (one line, e.g. lost compute
       workers or a map the engine refuses to write), or a bug (with its traceback)
  2    bad input: one line on stderr names the file or option and the problem, and nothing
       is written (an output that cannot be written counts as bad input)
  130  interrupted by Ctrl-C (SIGINT)
  143  stopped by SIGTERM (e.g. a batch scheduler); prime refine keeps its last complete
       iteration either way (continue with --continue)
"""


def number(text):
    """A finite float (argparse type): NaN and infinities are refused like any other non-number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value
