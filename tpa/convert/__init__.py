"""Converters from other checkpoints to T6 directories (``tpa convert ...``).

Each source has its own module with a Python function and a ``register(subparsers)`` for its
``tpa convert`` subcommand (:mod:`tpa.convert.cli` gathers them); what they share (safe weight
loading, state-dict checks, atomic directory writes) is in :mod:`tpa.convert.common`.
"""
