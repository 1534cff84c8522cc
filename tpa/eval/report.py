"""Deprecated: the helpers that lived here have one home each now; this module only hands the old
names on, so that code importing ``tpa.eval.report`` keeps working. New code imports them from
:mod:`tpa.utils.args`, :mod:`tpa.utils.files`, :mod:`tpa.utils.tables`, :mod:`tpa.utils.devices`,
:mod:`tpa.utils.runinfo` and :mod:`tpa.models.t6.loading`."""

from __future__ import annotations

import importlib

from tpa.utils.args import UsageError, parse_bytes, parse_ints, parse_list  # noqa: F401
from tpa.utils.devices import device_name, resolve_device, resolve_dtype  # noqa: F401
from tpa.utils.files import (  # noqa: F401
    atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text, print_written,
)
from tpa.utils.runinfo import run_metadata  # noqa: F401
from tpa.utils.tables import fmt_bytes, fmt_float, fmt_int, markdown_table  # noqa: F401

_LOADING = ("check_model_dir", "load_model_and_tokenizer", "model_label")  # import the model package: on use


def __getattr__(name: str):
    if name in _LOADING:
        return getattr(importlib.import_module("tpa.models.t6.loading"), name)
    raise AttributeError(f"module 'tpa.eval.report' has no attribute {name!r}")
