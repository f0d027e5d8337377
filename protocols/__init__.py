"""Scipion protocols of the PRIME plugin (installed as ``prime_plugin.protocols``).

Protocol classes are only defined where Scipion (``pwem``) is importable, so that
the engine and the command line work in environments without Scipion.
"""
