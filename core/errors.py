"""The engine's exceptions: bad input, and a run that cannot go on.

Every check on user input (files, STAR columns, symmetry names, sizes) raises
:class:`PrimeInputError` with a message that names the file (when there is one)
and the problem, in one line. The command line prints that line and exits with
status 2; library users can catch it (it is a ``ValueError``).
"""

import re


class PrimeInputError(ValueError):
    """Bad user input: a one-line message naming the file and the problem.

    ``parameter`` names the engine parameter the problem is about (e.g. ``"n_space"``), as
    the problem's text does, so that a front end can say it in its own words (the command
    line: ``--nspace``) with :meth:`reworded`.
    """

    def __init__(self, problem, path=None, parameter=None):
        self.problem = str(problem)
        self.path = None if path is None else str(path)
        self.parameter = parameter
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")

    def reworded(self, names):
        """The same error with its parameter's every mention replaced by ``names[parameter]``
        (itself when ``names`` has no entry for it)."""
        if self.parameter not in names:
            return self
        pattern = r"(?<![\w-])" + re.escape(self.parameter) + r"(?!\w)"
        problem = re.sub(pattern, lambda _: names[self.parameter], self.problem)
        return PrimeInputError(problem, self.path, self.parameter)


class PrimeRunError(RuntimeError):
    """A run that cannot go on for a reason outside the input (e.g. lost compute workers): one line."""
