"""transformers' own common model tests (``ModelTesterMixin``, and ``GenerationTesterMixin`` where
present) run against T6 with tiny ``tpa``, ``mha`` and ``mla`` configs.

The tests are read from the unpacked test suite of the *installed* transformers version, in the
directory ``TPA_TRANSFORMERS_TESTS`` names (``python .ci/fetch_transformers_tests.py DIR`` makes
it from the PyPI sdist; ``.ci/run`` does so); nothing of transformers lives in this repository.
Without that directory, or with tests of another version, the module skips. The PyPI sdist ships
``test_modeling_common.py`` but not the ``generation/`` and ``exporters/`` folders it imports;
where they are absent, their mixins are replaced by empty classes (so no generation or export test
runs from the sdist; T6's generation is tested in tests/models) and the tests that check for them
skip. ``SKIPS`` lists every other check that does not run, with the reason beside it.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import unittest
from importlib.metadata import version

import pytest

TESTS_DIR = os.environ.get("TPA_TRANSFORMERS_TESTS")
if not TESTS_DIR or not os.path.isfile(os.path.join(TESTS_DIR, "test_modeling_common.py")):
    pytest.skip("transformers' test suite is absent: run `python .ci/fetch_transformers_tests.py DIR` and set "
                "TPA_TRANSFORMERS_TESTS=DIR", allow_module_level=True)
_STAMP = os.path.join(TESTS_DIR, "TRANSFORMERS_VERSION")
_FETCHED = open(_STAMP).read().strip() if os.path.isfile(_STAMP) else None
if _FETCHED != version("transformers"):
    pytest.skip(f"TPA_TRANSFORMERS_TESTS holds the tests of transformers {_FETCHED}, the installed version is "
                f"{version('transformers')}: fetch them again", allow_module_level=True)
pytest.importorskip("parameterized", reason="transformers' tests need `parameterized` (the `test` extra)")

import torch  # noqa: E402

from tpa.models.t6 import T6Config, T6ForCausalLM, T6ForSequenceClassification, T6Model  # noqa: E402

PACKAGE = "transformers_tests"  # transformers' `tests` package under a name of its own (ours is `tests`)
MISSING_MIXINS = {"generation.test_utils": "GenerationTesterMixin", "exporters.test_export": "ExportTesterMixin"}


def _load_common():
    """Import ``test_modeling_common`` as ``transformers_tests.test_modeling_common``, standing in an
    empty mixin for each module the sdist lacks. Returns (module, names of the stand-ins)."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [TESTS_DIR]
        sys.modules[PACKAGE] = package
    stand_ins = []
    for module, mixin in MISSING_MIXINS.items():
        if os.path.isfile(os.path.join(TESTS_DIR, *module.split(".")) + ".py"):
            continue
        parent = f"{PACKAGE}.{module.split('.')[0]}"
        if parent not in sys.modules:
            sys.modules[parent] = types.ModuleType(parent)
            sys.modules[parent].__path__ = []
        stub = types.ModuleType(f"{PACKAGE}.{module}")
        setattr(stub, mixin, type(mixin, (), {"__doc__": "absent from the sdist: none of its tests runs"}))
        sys.modules[f"{PACKAGE}.{module}"] = stub
        stand_ins.append(mixin)
    return importlib.import_module(f"{PACKAGE}.test_modeling_common"), stand_ins


common, STAND_INS = _load_common()
ids_tensor = common.ids_tensor

# The mixins recognise a model's role (base model, causal LM, sequence classifier: which labels it
# takes, whether it trains) by looking its class name up in transformers' auto mappings, which list
# the models inside transformers. T6 joins them in the test module's view only (copies; the
# mappings transformers itself reads stay untouched), as it would if it lived in transformers.
for _mapping, _name in (("MODEL_MAPPING_NAMES", "T6Model"), ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "T6ForCausalLM"),
                        ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "T6ForSequenceClassification")):
    setattr(common, _mapping, {**getattr(common, _mapping), "t6": _name})

# Checks that do not run, each with its reason. Only checks that assume transformers' K/V-layout
# cache (`DynamicCache` of per-layer key/value tensors) or mixins absent from the sdist belong here.
SKIPS = {
    "test_generation_tester_mixin_inheritance":
        "GenerationTesterMixin is absent from the PyPI sdist (tests/generation/ is not shipped): the stand-in "
        "mixin would make this check meaningless",
}


class T6ModelTester:
    """Builds tiny configs and inputs, as the ``*ModelTester`` classes of transformers' model tests."""

    def __init__(self, parent, attention_type: str, batch_size=3, seq_length=7, vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, is_training=True):
        self.parent, self.attention_type = parent, attention_type
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.is_training = num_attention_heads, is_training

    def get_config(self) -> T6Config:
        extra = dict(q_rank=4, k_rank=2, v_rank=2) if self.attention_type == "tpa" else \
            dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4) if self.attention_type == "mla" else {}
        return T6Config(attention_type=self.attention_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                        head_dim=self.hidden_size // self.num_attention_heads, intermediate_size=37,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids))  # left-aligned rows of growing length
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class _T6ConformanceBase(common.ModelTesterMixin, unittest.TestCase):
    attention_type = "tpa"
    all_model_classes = (T6Model, T6ForCausalLM, T6ForSequenceClassification)
    test_resize_embeddings = True
    test_torch_exportable = False  # ExportTesterMixin is absent from the sdist (see the module docstring)

    def setUp(self):
        self.model_tester = T6ModelTester(self, self.attention_type)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, reason in SKIPS.items():
            if hasattr(cls, name):
                setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))


class TestT6ConformanceTPA(_T6ConformanceBase):
    attention_type = "tpa"


class TestT6ConformanceMHA(_T6ConformanceBase):
    attention_type = "mha"


class TestT6ConformanceMLA(_T6ConformanceBase):
    attention_type = "mla"


del _T6ConformanceBase  # not collected itself
