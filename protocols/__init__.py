"""Scipion protocols of the PRIME plugin (installed as ``prime_plugin.protocols``).

Protocol classes are only defined where Scipion (``pwem``) is importable, so that
the engine and the command line work in environments without Scipion.
"""

try:
    import pwem  # noqa: F401
except ImportError:
    pwem = None

if pwem is not None:
    from prime_plugin.protocols.protocol_postprocess import POSTPROCESS_OUTPUTS, ProtPrimePostprocess  # noqa: F401
    from prime_plugin.protocols.protocol_refine3d import PrimeRefineOutputs, ProtPrimeRefine3D  # noqa: F401
