"""tpa convert llama: the exact mode equals its source (HF Llama MHA/GQA, our MHA/GQA) in float64,
fitted modes write loadable models with Table 1's cache, bad input is a clear error that writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import tpa  # noqa: F401  (registers T6 with the Auto classes)
from tpa import T6Config, T6ForCausalLM
from tpa.cli import main
from tpa.convert.common import ConversionError
from tpa.convert.factor_fit import als_refine, relative_error, svd_init
from tpa.convert.llama import ConvertOptions, convert
from tpa.models.t6.hf_compat import CACHE_NAME

VOCAB = 96


def _save_llama(path: Path, heads: int, kv_heads: int, *, tie: bool = False, **extra) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=12,
                      max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=tie, initializer_range=0.2,
                      **extra)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1, so that a norm carried over wrongly shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def _save_t6(path: Path, attention_type: str, vocab: int = VOCAB, **extra) -> Path:
    torch.manual_seed(1)
    cfg = T6Config(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, head_dim=8,
                   attention_type=attention_type, max_position_embeddings=64, rope_theta=1000.0,
                   initializer_range=0.2, **extra)
    model = T6ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def _float64_llama(path: Path):
    """transformers' Llama in float64 with its float32 steps (RMSNorm, RoPE tables) done in float64, so
    that it is a float64 reference (the mapping, RoPE and layouts are what the comparison tests)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()

    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    theta, dim = model.config.rope_parameters["rope_theta"], model.config.head_dim

    def rope(x, position_ids):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = norm.__get__(module)
    model.model.rotary_emb.forward = rope
    return model


def _ids(batch: int = 2, seq: int = 37) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(5))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _converted(out: Path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()


@pytest.mark.parametrize("heads,kv_heads,tie", [(4, 4, False), (4, 2, True), (6, 3, False)])
def test_exact_llama_equals_source_in_float64(tmp_path, heads, kv_heads, tie):
    src = _save_llama(tmp_path / "llama", heads, kv_heads, tie=tie)
    report = convert(src, tmp_path / "tpa", ConvertOptions(exact=True, calibration_tokens=256, calibration_seq_len=32))
    assert report["attention_type"] == "tpa_kvonly" and report["k_rank"] == report["v_rank"] == kv_heads
    assert report["kv_cache_per_token_per_layer"] == {"source": 2 * kv_heads * 12, "converted": 2 * kv_heads * 12}
    ids = _ids()
    ref = _logits(_float64_llama(src), ids)
    got = _logits(_converted(tmp_path / "tpa"), ids)
    assert ref.dtype == got.dtype == torch.float64 and ref.abs().max() > 1.0
    assert (got - ref).abs().max() <= 1e-10
    # the unpatched transformers model (float32 steps inside) agrees to float32 precision
    from transformers import AutoModelForCausalLM

    plain = _logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval(), ids)
    assert (plain - got).abs().max() <= 1e-4 * plain.abs().max()
    assert json.loads((tmp_path / "tpa" / "conversion.json").read_text())["mode"] == "exact"


def test_exact_mistral_without_sliding_window_equals_source(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                        sliding_window=None, initializer_range=0.2)
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "mistral")
    convert(tmp_path / "mistral", tmp_path / "tpa", ConvertOptions(exact=True, calibration_tokens=256,
                                                                  calibration_seq_len=32))
    ids = _ids()
    ref = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "mistral", dtype=torch.float64).eval(), ids)
    assert (_logits(_converted(tmp_path / "tpa"), ids) - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("attention_type,q_rank", [("mha", None), ("gqa", None), ("gqa", 6), ("mqa", None)])
def test_exact_t6_equals_source_in_float64_with_and_without_cache(tmp_path, attention_type, q_rank):
    extra = {"num_key_value_heads": 3} if attention_type == "gqa" else {}
    src = _save_t6(tmp_path / "src", attention_type, **extra)
    report = convert(src, tmp_path / "tpa", ConvertOptions(exact=True, q_rank=q_rank, calibration_tokens=256,
                                                           calibration_seq_len=32))
    assert report["attention_type"] == ("tpa" if q_rank else "tpa_kvonly")
    source, converted = T6ForCausalLM.from_pretrained(src, dtype=torch.float64).eval(), _converted(tmp_path / "tpa")
    ids = _ids()
    ref, got = _logits(source, ids), _logits(converted, ids)
    assert (got - ref).abs().max() <= 1e-10
    # token-by-token decoding through the factor cache gives the same greedy continuation
    prompt = ids[:, :9]
    a = source.generate(prompt, max_new_tokens=6, do_sample=False)
    b = converted.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_exact_with_output_gate_head_norm_and_partial_rope_source(tmp_path):
    src = _save_t6(tmp_path / "src", "gqa", num_key_value_heads=2, attention_output_gate=True,
                   attention_head_norm=True, rope_partial_factor=0.5)
    convert(src, tmp_path / "tpa", ConvertOptions(exact=True, calibration_tokens=256, calibration_seq_len=32))
    ids = _ids()
    ref = _logits(T6ForCausalLM.from_pretrained(src, dtype=torch.float64).eval(), ids)
    assert (_logits(_converted(tmp_path / "tpa"), ids) - ref).abs().max() <= 1e-10


def _cache_elements_per_token(model, ids) -> list[int]:
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, use_cache=True), CACHE_NAME)
    return [sum(buf[0, 0].numel() for buf in layer.buffers.values()) for layer in cache.kv.layers]


@pytest.mark.parametrize("k_rank,v_rank,q_rank", [(2, 1, None), (1, 1, 3)])
def test_fitted_conversion_loads_with_table1_cache(tmp_path, k_rank, v_rank, q_rank):
    src = _save_llama(tmp_path / "llama", 4, 4)
    report = convert(src, tmp_path / "tpa", ConvertOptions(k_rank=k_rank, v_rank=v_rank, q_rank=q_rank,
                                                           calibration_tokens=1024, calibration_seq_len=32))
    heads, head_dim = 4, 12
    table1 = (k_rank + v_rank) * (heads + head_dim)  # contextual A and B: (R_k + R_v)(H + D)
    model = _converted(tmp_path / "tpa", torch.float32)
    assert model.config.attention_type == ("tpa" if q_rank else "tpa_kvonly") and model.config.tpa_contextual_a
    assert model.config.kv_cache_elements_per_token() == table1
    assert report["kv_cache_per_token_per_layer"] == {"source": 2 * heads * head_dim, "converted": table1}
    assert _cache_elements_per_token(model, _ids(1, 5)) == [table1, table1]
    parts = ["k", "v"] + (["q"] if q_rank else [])
    for layer in report["layers"]:
        assert sorted(layer["parts"]) == sorted(parts)
        for part in parts:
            tried = layer["parts"][part]["tried"]
            assert set(tried) == {"svd", "als"} and layer["parts"][part]["rel_error"] == min(tried.values())
            assert 0 < layer["parts"][part]["rel_error"] < 1.0
        assert 0 < layer["attention_output_rel_error"] < 2.0
    assert torch.isfinite(_logits(model, _ids())).all()


def test_fitted_conversion_on_calibration_data_of_our_own_model(tmp_path):
    from data.corpus import write_txt_corpus
    from tpa.data.prepare import PrepareConfig, prepare
    from tpa.data.sources import SourceSpec

    write_txt_corpus(tmp_path / "txt", 6, seed=0)
    data = tmp_path / "data"
    prepare(PrepareConfig(source=SourceSpec(source=[str(tmp_path / "txt")]), out=str(data), vocab_size=320,
                          val_fraction=0.1, progress=False))
    src = _save_t6(tmp_path / "src", "mha", vocab=320)
    low = convert(src, tmp_path / "r1", ConvertOptions(k_rank=1, v_rank=1, calibration=str(data),
                                                       calibration_tokens=2048, calibration_seq_len=32))
    high = convert(src, tmp_path / "r4", ConvertOptions(k_rank=4, v_rank=4, calibration=str(data),
                                                        calibration_tokens=2048, calibration_seq_len=32))
    assert low["calibration"] == str(data)
    small_vocab = _save_llama(tmp_path / "llama", 4, 2)  # 96 tokens: the data's 320-token ids do not fit
    with pytest.raises(ConversionError, match="tokenize the calibration text with the model's tokenizer"):
        convert(small_vocab, tmp_path / "bad", ConvertOptions(k_rank=1, v_rank=1, calibration=str(data)))
    assert not (tmp_path / "bad").exists()
    for part in ("k", "v"):  # a higher rank fits better
        assert all(h["parts"][part]["rel_error"] < l["parts"][part]["rel_error"]
                   for h, l in zip(high["layers"], low["layers"]))


def test_als_never_worse_than_its_svd_start_on_the_fit_tokens():
    torch.manual_seed(0)
    weight = torch.randn(5, 6, 10, dtype=torch.float64)
    x = torch.randn(400, 10, dtype=torch.float64) + 2 * torch.randn(10, dtype=torch.float64)
    for rank in (1, 2, 3):
        w_a, w_b = svd_init(weight, x, rank)
        refined = als_refine(weight, x, w_a, w_b)
        assert relative_error(*refined, weight, x) <= relative_error(w_a, w_b, weight, x) + 1e-12


def _assert_nothing_written(parent: Path, keep: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == keep


@pytest.mark.parametrize("case,match", [
    ("bias", "attention biases"),
    ("rope_scaling", "RoPE scaling rope_type='llama3'"),
    ("architecture", "unsupported architecture"),
    ("rank_above", "above the exact rank 2"),
    ("rank_equal", "equals the exact rank 2: use --exact"),
    ("exact_rank", "--exact: the exact k-rank of this source is 2"),
    ("missing_weights", "no weights in"),
    ("missing_config", "config.json not found"),
    ("pickle_only", "could not be read as a plain state dict"),
    ("tpa_source", "attention type 'tpa' cannot be converted"),
    ("mqa_fitted", "MQA"),
    ("sliding_window", "sliding-window attention (sliding_window=16 < max_position_embeddings=64)"),
])
def test_bad_input_is_a_clear_error_that_writes_nothing(tmp_path, case, match):
    src = tmp_path / "src"
    options = ConvertOptions(k_rank=1, v_rank=1, calibration_tokens=256, calibration_seq_len=32)
    if case == "bias":
        _save_llama(src, 4, 2, attention_bias=True)
    elif case == "rope_scaling":
        _save_llama(src, 4, 2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif case == "architecture":
        _save_llama(src, 4, 2)
        raw = json.loads((src / "config.json").read_text())
        raw.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
        (src / "config.json").write_text(json.dumps(raw))
    elif case in ("rank_above", "rank_equal", "exact_rank"):
        _save_llama(src, 4, 2)
        rank = {"rank_above": 3, "rank_equal": 2, "exact_rank": 1}[case]
        options = ConvertOptions(exact=case == "exact_rank", k_rank=rank, v_rank=1)
    elif case in ("missing_weights", "missing_config"):
        _save_llama(src, 4, 2)
        (src / ("model.safetensors" if case == "missing_weights" else "config.json")).unlink()
    elif case == "pickle_only":
        _save_llama(src, 4, 2)
        (src / "model.safetensors").unlink()
        torch.save({"weights": torch.nn.Linear(2, 2)}, src / "pytorch_model.bin")  # a module: refused by weights_only
    elif case == "tpa_source":
        _save_t6(src, "tpa")
    elif case == "mqa_fitted":
        _save_t6(src, "mqa")
    elif case == "sliding_window":
        from transformers import MistralConfig, MistralForCausalLM

        MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         sliding_window=16)).save_pretrained(src)
    with pytest.raises(ConversionError, match=re.escape(match)):
        convert(src, tmp_path / "out", options)
    _assert_nothing_written(tmp_path, {"src"})


def test_existing_out_is_refused(tmp_path):
    src = _save_t6(tmp_path / "src", "mha")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert(src, tmp_path / "out", ConvertOptions(exact=True))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(src, tmp_path / "out", ConvertOptions(exact=True, overwrite=True, calibration_tokens=256,
                                                  calibration_seq_len=32))
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "conversion.json").is_file()


def test_cli(tmp_path, capsys):
    src = _save_llama(tmp_path / "llama", 4, 2)
    code = main(["convert", "llama", str(src), "--out", str(tmp_path / "tpa"), "--k-rank", "1", "--v-rank", "1",
                 "--calibration-tokens", "512", "--calibration-seq-len", "32"])
    out = capsys.readouterr().out
    assert code == 0 and "KV cache per token per layer: 48 -> 32" in out and "attention-output" in out
    code = main(["convert", "llama", str(src), "--out", str(tmp_path / "bad"), "--k-rank", "5"])
    assert code == 1 and "above the exact rank" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
