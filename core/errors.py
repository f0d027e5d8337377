"""The engine's exceptions: bad input, and a run that cannot go on.

Every check on user input (files, STAR columns, symmetry names, sizes) raises
:class:`PrimeInputError` with a message that names the file (when there is one)
and the problem, in one line. The command line prints that line and exits with
status 2; library users can catch it (it is a ``ValueError``).
"""


class PrimeInputError(ValueError):
    """Bad user input: a one-line message naming the file and the problem."""

    def __init__(self, problem, path=None):
        self.problem = str(problem)
        self.path = None if path is None else str(path)
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class PrimeRunError(RuntimeError):
    """A run that cannot go on for a reason outside the input (e.g. lost compute workers): one line."""
