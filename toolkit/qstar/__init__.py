"""q* sampling: per-token geometric mixtures of two models with an adaptive weight α.

The pieces live in :mod:`toolkit.qstar.alpha` (the α solve) and
:mod:`toolkit.qstar.diagnostics`; nothing is imported here, so that ``cli.py analyze --help``
and ``generate --help`` do not pay for torch.
"""
