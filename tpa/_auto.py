"""Registering T6 with transformers' Auto classes without importing transformers at ``import tpa``.

``import tpa`` must stay cheap (``tpa --help``, tools that only read a name), yet the documented
``import tpa; AutoModelForCausalLM.from_pretrained(t6_dir)`` must keep working. So ``import tpa``
registers T6 at once where transformers' Auto modules are already loaded; otherwise it watches the
imports of transformers' modules, and once one of the Auto modules has been imported and no module
of transformers is still half-way through its own import (an Auto module is often imported from
inside another transformers module), it imports :mod:`tpa.models.t6`, whose import registers
``T6Config`` with ``AutoConfig`` and ``T6ForCausalLM`` with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import importlib
import sys

_AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")
_state = {"registered": False, "running": False, "auto_loaded": False, "depth": 0}


def _register() -> None:
    """Import :mod:`tpa.models.t6` (its import registers T6 with the Auto classes), once."""
    if _state["registered"] or _state["running"]:
        return
    _uninstall()
    _state["running"] = True
    try:
        importlib.import_module("tpa.models.t6")
        _state["registered"] = True
    finally:
        _state["running"] = False


class _WatchingLoader:
    """Runs a transformers module's own loader, counting how deep such imports are nested; after
    the outermost one, registers T6 if an Auto module was imported meanwhile."""

    def __init__(self, inner, name: str):
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        _state["depth"] += 1
        try:
            self._inner.exec_module(module)
        finally:
            _state["depth"] -= 1
        if self._name in _AUTO_MODULES:
            _state["auto_loaded"] = True
        if _state["auto_loaded"] and _state["depth"] == 0:
            _register()

    def __getattr__(self, name):  # get_source, get_data, ... of the wrapped loader
        return getattr(self._inner, name)


class _TransformersFinder:
    """A meta path finder (duck-typed: importlib.abc costs a tenth of a second to import) that finds
    transformers' modules through the other finders and wraps their loaders."""

    def find_spec(self, name, path, target=None):
        if not (name == "transformers" or name.startswith("transformers.")) or _state["registered"]:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WatchingLoader(spec.loader, name)
                return spec
        return None


_FINDER = _TransformersFinder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def register_when_transformers_loads() -> None:
    """Register T6 now if transformers' Auto modules are loaded, else as soon as one of them is."""
    if any(name in sys.modules for name in _AUTO_MODULES):
        _register()
    elif _FINDER not in sys.meta_path and not _state["registered"]:
        sys.meta_path.insert(0, _FINDER)
