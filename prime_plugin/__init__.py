"""scipion-em-prime: PRIME / stochastic hill climbing cryo-EM 3D refinement.

The numerical engine lives in :mod:`prime_plugin.core` and never imports Scipion.
This module must import cleanly without Scipion installed; the Scipion ``Plugin``
class is defined only where ``pwem`` is importable.
"""

from prime_plugin.version import __version__

__all__ = ["__version__"]
