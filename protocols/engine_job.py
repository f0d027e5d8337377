"""Running the ``prime`` command from a protocol: the program of Scipion's interpreter, and the
engine's one-line reason when a run fails (shared by every PRIME protocol)."""

import os
import sys

__all__ = ["PrimeEngineJob"]


class PrimeEngineJob:
    """Mix-in of a pwem protocol that runs ``prime COMMAND ...`` through Scipion's job mechanism."""

    def _primeProgram(self):
        """The ``prime`` script of the interpreter running the protocol (Scipion's environment)."""
        script = os.path.join(os.path.dirname(sys.executable), "prime")
        return script if os.path.exists(script) else f"{sys.executable} -m prime_plugin.cli"

    def _engineError(self, command):
        """The last 'prime COMMAND: error: ...' line of this run's logs, or None."""
        for log in (self.getStderrLog(), self.getStdoutLog()):
            if os.path.exists(log):
                with open(log, errors="replace") as text:
                    lines = [line.strip() for line in text if line.startswith(f"prime {command}: ")]
                if lines:
                    return lines[-1]
        return None

    def _runPrime(self, arguments):
        """``runJob`` of ``prime ARGUMENTS`` (the command first); a failure is raised with the engine's
        one-line reason (more use than "exit status 2") when the logs hold one."""
        try:
            self.runJob(self._primeProgram(), arguments)
        except Exception as failure:
            reason = self._engineError(arguments.split(maxsplit=1)[0])
            if reason is None:
                raise
            raise RuntimeError(reason) from failure
