"""Loading a saved T6 directory quantized: bitsandbytes 8-bit and torchao int8 weight-only run (on
the CPU here), 4-bit bitsandbytes runs where its kernels take the layer shapes and otherwise fails
with a clear message."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tpa.models.t6 import T6Config, T6ForCausalLM

VOCAB = 101
TYPES = ["tpa", "mla"]  # the fused factor projection, and the absorbed path reading kv_b_proj's weight


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for attention_type in TYPES:
        path = tmp_path_factory.mktemp(attention_type)
        torch.manual_seed(0)
        T6ForCausalLM(T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=2)) \
            .save_pretrained(path)
        out[attention_type] = path
    return out


def check_quantized(model, path, module_type: str):
    ids = torch.randint(1, VOCAB, (2, 7))
    ref = T6ForCausalLM.from_pretrained(path).eval()
    assert type(model.model.layers[0].mlp.down_proj).__name__ == module_type or \
        type(model.model.layers[0].mlp.down_proj.weight).__name__ == module_type
    with torch.no_grad():
        logits, expected = model(ids).logits.float(), ref(ids).logits
    err = (logits - expected).abs().max() / expected.abs().max()
    assert 0 < err < 0.05, f"relative error {err:.3g}"  # quantized (not identical), and close
    cached = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    uncached = model.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attention_type", TYPES)
def test_bitsandbytes_8bit(saved, attention_type):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(saved[attention_type], device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    check_quantized(model, saved[attention_type], "Linear8bitLt")


@pytest.mark.parametrize("attention_type", TYPES)
def test_torchao_int8_weight_only(saved, attention_type):
    pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(saved[attention_type], device_map="cpu",
                                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    check_quantized(model, saved[attention_type], "Int8Tensor")


@pytest.mark.parametrize("attention_type,unpackable", [("tpa", ["self_attn.o_proj", "self_attn.proj"]),
                                                       ("mla", ["self_attn.kv_a_proj"])])
def test_bitsandbytes_4bit_on_cpu_names_the_layers_it_cannot_pack(saved, attention_type, unpackable):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig

    ids = torch.randint(1, VOCAB, (1, 6))
    model = AutoModelForCausalLM.from_pretrained(saved[attention_type], device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match="4-bit CPU kernels need") as err:
        model(ids)
    assert f"the T6 layers {unpackable} are not" in str(err.value)
    # the way out the message names works
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=unpackable + ["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(saved[attention_type], device_map="cpu", quantization_config=config)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    cached = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))


@pytest.mark.gpu
@pytest.mark.parametrize("attention_type", TYPES)
def test_bitsandbytes_4bit_on_gpu(saved, attention_type):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(saved[attention_type], device_map="cuda", quantization_config=config)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ids = torch.randint(1, VOCAB, (1, 6), device="cuda")
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)
