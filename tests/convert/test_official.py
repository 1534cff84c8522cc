"""``tpa convert official``: every official model kind converts, loads with transformers' Auto classes,
generates and matches the official forward; tampered checkpoints are refused and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tpa  # registers T6 with the Auto classes
from tpa.cli import main
from tpa.convert.common import ConversionError, relative_error
from tpa.convert.official import convert_official
from tpa.convert.official_reference import official_forward
from tpa.convert.official_spec import read_spec
from tests.convert.official_checkpoints import KINDS, write_official_checkpoint

MLA_SMALL = dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12)
# float64 comparisons: our RoPE tables are float32 (about 6e-8 relative), the rest is exact
F64_TOLERANCE = 1e-6
ATTENTION = {"T6": "tpa", "T6_kvonly": "tpa_kvonly", "llama-mha": "mha", "llama-gqa": "gqa",
             "llama-mqa": "mqa", "llama-mla": "mla"}


def official_logits(config, tensors, ids):
    """The official forward on the source tensors in float64 (norm epsilon of the float32 residuals)."""
    tensors = {k: v.double() for k, v in tensors.items()}
    return official_forward(read_spec(config, tensors), tensors, ids, norm_eps=torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("kind", KINDS)
def test_each_official_kind_converts_loads_generates_and_matches(tmp_path, kind):
    extra = MLA_SMALL if kind == "llama-mla" else {}
    config, tensors = write_official_checkpoint(tmp_path / "official", kind, **extra)
    result = convert_official(tmp_path / "official", tmp_path / "t6")
    assert (result.kind, result.attention_type) == (kind, ATTENTION[kind])
    assert result.relative_error <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t6", dtype=torch.float64).eval()
    assert type(model).__name__ == "T6ForCausalLM" and model.config.attention_type == ATTENTION[kind]
    assert model.config.intermediate_size == 106  # floor(8/3 * 40), as given (not rounded up to 128)
    if kind == "llama-mha":
        assert model.config.head_dim == 10  # C / n_head, whatever the config's head_dim says
    ids = torch.randint(0, config["vocab_size"], (2, 19))
    with torch.no_grad():
        assert relative_error(model(ids).logits, official_logits(config, tensors, ids)) <= F64_TOLERANCE
        out = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    # greedy decoding with the cache picks the official model's argmax at every step
    assert out.shape == (2, 11)
    with torch.no_grad():
        steps = official_logits(config, tensors, out)[:, 4:-1].argmax(-1)
    assert torch.equal(out[:, 5:], steps)
    record = json.loads((tmp_path / "t6" / "conversion.json").read_text())
    assert record["kind"] == kind and record["relative_error"] == result.relative_error


@pytest.mark.parametrize("kind", ["T6", "T6_kvonly", "llama-mha", "llama-gqa"])
def test_groupnorm_and_partial_rope_checkpoints_convert(tmp_path, kind):
    """Official options: per-head output RMSNorm (using_groupnorm) and partial RoPE (rope_partial_factor)."""
    config, tensors = write_official_checkpoint(tmp_path / "official", kind, using_groupnorm=True,
                                                rope_partial_factor=1 / 3)
    convert_official(tmp_path / "official", tmp_path / "t6")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t6", dtype=torch.float64).eval()
    assert model.config.attention_head_norm and model.config.rope_partial_factor == pytest.approx(1 / 3)
    ids = torch.randint(0, config["vocab_size"], (2, 13))
    with torch.no_grad():
        assert relative_error(model(ids).logits, official_logits(config, tensors, ids)) <= F64_TOLERANCE


def test_mla_latent_sizes_default_to_the_official_ones(tmp_path):
    """The training script never saves MLA's latent sizes: the official defaults 512/256/32/64 apply."""
    write_official_checkpoint(tmp_path / "official", "llama-mla", n_layer=1)
    convert_official(tmp_path / "official", tmp_path / "t6")
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "t6").config
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim) == (512, 256, 32, 64)
    assert cfg.mla_latent_norm_eps == 1e-6 and cfg.rms_norm_eps == torch.finfo(torch.float32).eps


def test_cli_with_tokenizer_and_safetensors_source(tmp_path):
    from safetensors.torch import save_file

    from tests.models.test_hf import train_tokenizer

    config, tensors = write_official_checkpoint(tmp_path / "official", "T6", vocab_size=300)
    (tmp_path / "official" / "pytorch_model.bin").unlink()
    del tensors["lm_head.weight"]  # safetensors keeps one of two shared tensors
    save_file(tensors, tmp_path / "official" / "model.safetensors")
    train_tokenizer(vocab_size=300).save_pretrained(tmp_path / "tok")
    assert main(["convert", "official", str(tmp_path / "official"), "--out", str(tmp_path / "t6"),
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    model, tok = tpa.models.t6.load_model_and_tokenizer(tmp_path / "t6")
    assert model.config.eos_token_id == tok.eos_token_id
    ids = tok("To be, or not to be", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert relative_error(model(ids).logits, official_logits(config, tensors, ids)) <= 1e-4


class NotATensor:
    pass


def tamper_pickle(tensors):
    tensors["transformer.h.0.attn.payload"] = NotATensor()


def tamper_shape(tensors):
    tensors["transformer.h.1.mlp.c_fc1.weight"] = tensors["transformer.h.1.mlp.c_fc1.weight"][:-1]


def tamper_key(tensors):
    tensors["transformer.h.0.attn.c_qkv.W_C_q.weight"] = torch.zeros(3, 40)


def tamper_missing(tensors):
    del tensors["transformer.h.1.attn.c_qkv.W_B_v.weight"]


def tamper_nested(tensors):
    tensors["optimizer"] = {"step": torch.tensor(3)}  # a training checkpoint, not a state dict


@pytest.mark.parametrize("tamper,message", [
    (tamper_pickle, "plain state dict of tensors"),
    (tamper_nested, r"must hold a flat \{name: tensor\} state dict"),
    (tamper_shape, r"transformer.h.1.mlp.c_fc1.weight has shape \(105, 40\), expected \(106, 40\)"),
    (tamper_key, "unexpected tensors: transformer.h.0.attn.c_qkv.W_C_q.weight"),
    (tamper_missing, "missing tensors: transformer.h.1.attn.c_qkv.W_B_v.weight"),
])
def test_tampered_checkpoint_is_refused_and_nothing_is_written(tmp_path, tamper, message):
    _, tensors = write_official_checkpoint(tmp_path / "official", "T6")
    tamper(tensors)
    torch.save(tensors, tmp_path / "official" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=message):
        convert_official(tmp_path / "official", tmp_path / "t6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]
    assert main(["convert", "official", str(tmp_path / "official"), "--out", str(tmp_path / "t6")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]


def test_pickle_with_code_is_never_executed(tmp_path):
    """A pickle that would run code on load is refused by weights_only loading (the code never runs)."""
    import pickle

    write_official_checkpoint(tmp_path / "official", "llama-mha")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "official" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Payload()}, f)
    with pytest.raises(ConversionError, match="could not be read"):
        convert_official(tmp_path / "official", tmp_path / "t6")
    assert not marker.exists() and not (tmp_path / "t6").exists()


def test_unknown_models_and_configs_are_clear_errors(tmp_path):
    _, tensors = write_official_checkpoint(tmp_path / "official", "T6")
    renamed = {k.replace("c_qkv.W_A_q", "c_qkv.W_X_q"): v for k, v in tensors.items()}
    torch.save(renamed, tmp_path / "official" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="not a checkpoint of a known official model"):
        convert_official(tmp_path / "official", tmp_path / "t6")
    write_official_checkpoint(tmp_path / "decay", "T6", rope_decay_base=0.999)
    with pytest.raises(ConversionError, match="rope_decay_base"):
        convert_official(tmp_path / "decay", tmp_path / "t6")
    write_official_checkpoint(tmp_path / "wrong_rank", "T6", tensors=tensors, rank=3)
    with pytest.raises(ConversionError, match="W_A_k.weight has shape"):
        convert_official(tmp_path / "wrong_rank", tmp_path / "t6")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="config.json not found"):
        convert_official(tmp_path / "empty", tmp_path / "t6")
    assert not (tmp_path / "t6").exists()


def test_failed_verification_writes_nothing(tmp_path):
    write_official_checkpoint(tmp_path / "official", "T6")
    with pytest.raises(ConversionError, match="verification failed"):
        convert_official(tmp_path / "official", tmp_path / "t6", tolerance=0.0)
    assert not (tmp_path / "t6").exists()


def test_existing_output_needs_overwrite(tmp_path):
    write_official_checkpoint(tmp_path / "official", "llama-gqa")
    (tmp_path / "t6").mkdir()
    (tmp_path / "t6" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_official(tmp_path / "official", tmp_path / "t6")
    assert (tmp_path / "t6" / "keep.txt").read_text() == "mine"
    convert_official(tmp_path / "official", tmp_path / "t6", overwrite=True)
    assert not (tmp_path / "t6" / "keep.txt").exists() and (tmp_path / "t6" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official", "t6"]


def test_bfloat16_checkpoint_is_verified_in_float32_and_written_in_bfloat16(tmp_path):
    _, tensors = write_official_checkpoint(tmp_path / "official", "T6_kvonly")
    tensors = {k: v.bfloat16() for k, v in tensors.items()}
    write_official_checkpoint(tmp_path / "official", "T6_kvonly", tensors=tensors)
    assert convert_official(tmp_path / "official", tmp_path / "t6").relative_error <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t6", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, tensors["transformer.wte.weight"])


def test_compiled_model_prefixes_are_stripped(tmp_path):
    """A state dict saved from a torch.compile'd model carries ``_orig_mod.`` on every key."""
    _, tensors = write_official_checkpoint(tmp_path / "official", "llama-gqa")
    torch.save({"_orig_mod." + k: v for k, v in tensors.items()}, tmp_path / "official" / "pytorch_model.bin")
    assert convert_official(tmp_path / "official", tmp_path / "t6").kind == "llama-gqa"


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    """``save_pretrained`` splits large models (the XL runs) into shards listed in an index."""
    _, tensors = write_official_checkpoint(tmp_path / "official", "T6")
    src = tmp_path / "official"
    (src / "pytorch_model.bin").unlink()
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: tensors[k] for k in keys}, src / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert convert_official(src, tmp_path / "t6").kind == "T6"
    weight_map[names[0]] = "../outside.bin"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match="shard outside the directory"):
        convert_official(src, tmp_path / "t6b")
