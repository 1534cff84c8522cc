"""Start-up cost: ``import tpa`` and ``tpa --help`` import no heavy module, and ``import tpa`` still
registers T6 with transformers' Auto classes (whatever transformers module is imported first).

Each check runs in a fresh interpreter (this process has long imported everything)."""

import subprocess
import sys

import pytest

COMMANDS = ("data", "train", "demo", "generate", "eval", "bench", "ablate", "convert")
HEAVY = ("torch", "transformers", "numpy", "triton", "tokenizers", "yaml", "matplotlib", "datasets", "lm_eval")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _heavy_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    return _run(probe).split()


def test_import_tpa_imports_no_heavy_module():
    assert _heavy_after("import tpa") == []


def test_tpa_help_imports_no_heavy_module():
    """Building the parser registers every command (none is dropped) and prints the help."""
    code = ("import argparse, contextlib, io\nfrom tpa.cli import build_parser, main\np = build_parser()\n"
            "sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))\n"
            "assert sorted(sub.choices) == sorted(%r), sorted(sub.choices)\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass" % (COMMANDS,))
    assert _heavy_after(code) == []


@pytest.mark.parametrize("first_import", [
    "from transformers import AutoModelForCausalLM",
    "from transformers import AutoConfig",
    "from transformers.modeling_layers import GradientCheckpointingLayer",
])
def test_import_tpa_registers_t6_with_the_auto_classes(first_import):
    code = (f"import tpa\n{first_import}\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "config = AutoConfig.for_model('t6', preset='tiny')\n"
            "print(type(config).__name__, AutoModelForCausalLM._model_mapping[type(config)].__name__)")
    assert _run(code) == "T6Config T6ForCausalLM"


def test_import_tpa_after_transformers_registers_at_once_and_names_load_on_use():
    code = ("from transformers import AutoModelForCausalLM\nimport tpa, sys\n"
            "print('tpa.models.t6' in sys.modules, AutoModelForCausalLM._model_mapping[tpa.T6Config].__name__, "
            "tpa.T6Model.__name__, tpa.T6Cache.__name__, tpa.KVCache.__name__, "
            "tpa.layers.TensorProductAttention.__name__, tpa.ops.tpa_decode.__name__, 'mla' in tpa.ATTENTION_TYPES, "
            "'tiny' in tpa.PRESETS)")
    assert _run(code) == "True T6ForCausalLM T6Model T6Cache KVCache TensorProductAttention tpa_decode True True"
