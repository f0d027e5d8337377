"""scipion-em-prime: PRIME / stochastic hill climbing cryo-EM 3D refinement.

The numerical engine lives in :mod:`prime_plugin.core` and never imports Scipion.
This module must import cleanly without Scipion installed; the Scipion ``Plugin``
class (found by Scipion through the ``pyworkflow.plugin`` entry point) is defined
only where ``pwem`` is importable.
"""

import os

from prime_plugin.version import __version__

__all__ = ["__version__"]

_references = ["Elmlund2013", "Reboul2016", "Reboul2018", "Reboul2018b"]

try:
    import pwem as _pwem
except ImportError:  # the engine and the command line work without Scipion
    _pwem = None

if _pwem is not None:
    import pyworkflow.utils as _pwutils

    class Plugin(_pwem.Plugin):
        """Scipion plugin of PRIME: pure Python, nothing to install beyond the package."""

        _url = "https://pypi.org/project/scipion-em-prime/"
        _processingField = ["SPA"]

        def getName(self):
            return "prime"  # protocols show as "prime - 3D refine"

        @classmethod
        def _defineVariables(cls):
            pass  # no external binaries; Scipion's _vars is shared by all plugins, so define none

        @classmethod
        def getEnviron(cls):
            return _pwutils.Environ(os.environ)

        @classmethod
        def defineBinaries(cls, env):
            pass

        def getPluginTemplateDir(self):
            # templates/ is installed as the package prime_plugin.templates, which an
            # editable install maps outside prime_plugin's folder: ask the package itself.
            import prime_plugin.templates as templates

            return list(templates.__path__)[0]

    __all__.append("Plugin")
