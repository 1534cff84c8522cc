"""Converters from other checkpoints to T6 directories (``tpa convert ...``).

Each source has its own module with a Python function and a ``_run(args)`` handler for its
``tpa convert`` subcommand, whose parser :mod:`tpa.convert.cli` declares; what they share (safe weight
loading, state-dict checks, atomic directory writes) is in :mod:`tpa.convert.common`.
"""
