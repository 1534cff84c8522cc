"""`tpa bench train` and `tpa bench generate` end to end at a tiny size on the CPU."""

from __future__ import annotations

import csv
import json

import torch

from tpa.cli import main
from tpa.models.presets import ATTENTION_TYPES
from tpa.models.t6.hf_compat import cache_kwargs


def test_bench_train_every_type(corpus, tmp_path, capsys):
    out = tmp_path / "train"
    rc = main(["bench", "train", "--preset", "tiny", "--data", str(corpus[1]), "--steps", "2", "--warmup", "1",
               "--micro-batch", "2", "--seq-len", "16", "--vocab-size", "384", "--compile", "off", "--device", "cpu",
               "--peak-tflops", "0.5", "--loops", "trainer", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "train.json").read_text())
    assert [r["attention_type"] for r in record["rows"]] == list(ATTENTION_TYPES)
    for r in record["rows"]:
        assert r["status"] == "ok" and r["compile"] is False
        assert r["loop"] == "trainer" and r["model"] == "T6ForCausalLM"
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and r["parameters"] > 0
        assert 0 < r["mfu"] < 1  # from the given peak; a CPU has no known one
    # the timed tokens are exactly the --steps after the --warmup steps
    assert all(r["timed_steps_tokens"] == 2 * 2 * 16 for r in record["rows"])
    with open(out / "train.csv") as f:
        assert len(list(csv.DictReader(f))) == len(ATTENTION_TYPES)
    assert f"wrote {out / 'train.md'}" in printed
    assert "| T6ForCausalLM | tpa | trainer, eager |" in (out / "train.md").read_text()


def test_bench_train_both_loops_and_the_llama_reference(corpus, tmp_path):
    """One run: the trainer's rows, then the whole-model-compile loop's, transformers' LlamaForCausalLM of
    the MHA model's size first (aot_eager: the loop through dynamo and AOT autograd, no code generation)."""
    out = tmp_path / "train"
    rc = main(["bench", "train", "--preset", "tiny", "--data", str(corpus[1]), "--types", "mha", "--steps", "2",
               "--warmup", "1", "--micro-batch", "2", "--seq-len", "16", "--vocab-size", "384", "--compile", "off",
               "--compile-backend", "aot_eager", "--device", "cpu", "--peak-tflops", "0.5", "--output", str(out)])
    assert rc == 0
    record = json.loads((out / "train.json").read_text())
    assert [(r["model"], r["loop"]) for r in record["rows"]] == [
        ("T6ForCausalLM", "trainer"), ("LlamaForCausalLM", "model-compile"), ("T6ForCausalLM", "model-compile")]
    for r in record["rows"]:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_gb"] > 0
        assert r["attention_type"] == "mha" and r["heads"] == 4
    assert len({r["parameters"] for r in record["rows"]}) == 1  # the reference is the same size
    compiled = record["rows"][1:]
    assert all(r["compile"] is True and r["timed_steps_tokens"] == 2 * 2 * 16 for r in compiled)
    assert all(r["final_loss"] > 0 for r in compiled)
    table = (out / "train.md").read_text()
    assert "| LlamaForCausalLM | mha | torch.compile(model) |" in table
    assert "| T6ForCausalLM | mha | torch.compile(model) |" in table
    with open(out / "train.csv") as f:
        assert [row["loop"] for row in csv.DictReader(f)] == ["trainer", "model-compile", "model-compile"]


def test_bench_train_model_compile_loop_needs_no_data(tmp_path):
    out = tmp_path / "train"
    rc = main(["bench", "train", "--preset", "tiny", "--data", str(tmp_path / "none"), "--loops", "model-compile",
               "--reference", "none", "--types", "mqa", "--steps", "1", "--warmup", "0", "--micro-batch", "1",
               "--seq-len", "8", "--vocab-size", "128", "--compile-backend", "aot_eager", "--device", "cpu",
               "--output", str(out)])
    assert rc == 0
    (row,) = json.loads((out / "train.json").read_text())["rows"]
    assert row["status"] == "ok" and row["model"] == "T6ForCausalLM" and row["mfu"] is None  # no CPU peak


def test_bench_train_profile_writes_the_profiled_steps(tmp_path):
    out = tmp_path / "train"
    rc = main(["bench", "train", "--preset", "tiny", "--data", str(tmp_path / "none"), "--loops", "model-compile",
               "--reference", "none", "--types", "tpa", "--steps", "1", "--warmup", "0", "--micro-batch", "1",
               "--seq-len", "8", "--vocab-size", "128", "--compile-backend", "aot_eager", "--device", "cpu",
               "--profile", "--output", str(out)])
    assert rc == 0
    text = (out / "profile_T6ForCausalLM_tpa.txt").read_text()
    assert text.startswith("3 profiled steps") and "aten::" in text


def test_bench_train_bad_arguments(corpus, tmp_path, capsys):
    assert main(["bench", "train", "--preset", "giant", "--data", str(corpus[1]), "--output", str(tmp_path)]) == 2
    assert "unknown preset 'giant'" in capsys.readouterr().err
    missing = str(tmp_path / "none")
    assert main(["bench", "train", "--preset", "tiny", "--data", missing, "--output", str(tmp_path)]) == 2
    assert "tpa data prepare" in capsys.readouterr().err
    assert main(["bench", "train", "--preset", "tiny", "--data", str(corpus[1]), "--vocab-size", "100",
                 "--output", str(tmp_path)]) == 2
    assert "smaller than the data's tokenizer" in capsys.readouterr().err


def test_bench_generate_tiny(tmp_path, capsys):
    """The T6 types and transformers' Llama in one run; decode time from two generation lengths."""
    out = tmp_path / "gen"
    rc = main(["bench", "generate", "--preset", "tiny", "--types", "tpa", "mha", "gqa", "mla", "llama",
               "--contexts", "12,40", "--batch-sizes", "1", "2", "--new-tokens", "7", "--short-tokens", "1",
               "--prefill-chunk", "16", "--device", "cpu", "--output", str(out)])
    assert rc == 0
    record = json.loads((out / "generate.json").read_text())
    rows = record["rows"]
    assert record["decode_mode"] == "eager" and {r["decode_mode"] for r in rows} == {"eager"}  # no graphs on CPU
    assert "decode eager" in (out / "generate.md").read_text()
    assert len(rows) == 5 * 2 * 2
    params = {r["attention_type"]: r["parameters"] for r in rows if r["attention_type"] != "llama"}
    assert max(params.values()) / min(params.values()) < 1.05  # matched parameter counts
    for r in rows:
        assert r["status"] == "ok", r
        assert r["new_tokens"] == 7 and r["short_new_tokens"] == 1
        assert r["generate_long_s"] > 0 and r["generate_short_s"] > 0
        assert r["decode_s"] == r["generate_long_s"] - r["generate_short_s"]
        assert r["end_to_end_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        if r["decode_tokens_per_s"] is not None:  # None only where the difference is within timer noise
            assert r["decode_tokens_per_s"] == r["batch"] * 6 / r["decode_s"]
        # the cache holds exactly Table 1's bytes for context + new tokens (a T6Cache is allocated for all
        # of them; transformers' DynamicCache holds what went through the model: all but the last new token)
        held_tokens = r["context"] + r["new_tokens"] - (r["attention_type"] == "llama")
        per_token = r["predicted_kv_cache_bytes"] // (r["context"] + r["new_tokens"])
        assert r["kv_cache_bytes"] == per_token * held_tokens, r
    llama = [r for r in rows if r["attention_type"] == "llama"]
    gqa = [r for r in rows if r["attention_type"] == "gqa"]
    # transformers' Llama at gqa's KV heads: the same cached bytes per token, query heads hidden_size // head_dim
    assert [r["predicted_kv_cache_bytes"] for r in llama] == [r["predicted_kv_cache_bytes"] for r in gqa]
    assert {r["heads"] for r in llama} == {128 // 32} and {r["kv_heads"] for r in llama} == {gqa[0]["kv_heads"]}
    assert (out / "generate.csv").is_file() and "| llama |" in (out / "generate.md").read_text()


def test_bench_generate_llama_matched_to_mha_and_mqa(tmp_path):
    """``llama-mha`` and ``llama-mqa`` are transformers' Llama at the KV heads, width and depth of the
    preset's MHA and MQA: the same cached bytes per token as each, query heads hidden_size // head_dim."""
    out = tmp_path / "gen"
    rc = main(["bench", "generate", "--preset", "tiny", "--types", "mha", "mqa", "llama-mha", "llama-mqa",
               "--contexts", "12", "--batch-sizes", "2", "--new-tokens", "4", "--short-tokens", "1",
               "--device", "cpu", "--output", str(out)])
    assert rc == 0
    rows = {r["attention_type"]: r for r in json.loads((out / "generate.json").read_text())["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for t6, llama in (("mha", "llama-mha"), ("mqa", "llama-mqa")):
        assert rows[llama]["kv_heads"] == (rows[t6]["kv_heads"] or rows[t6]["heads"])
        assert rows[llama]["predicted_kv_cache_bytes"] == rows[t6]["predicted_kv_cache_bytes"]
        assert rows[llama]["heads"] == 128 // 32
    assert rows["llama-mqa"]["kv_heads"] == 1
    assert main(["bench", "generate", "--preset", "tiny", "--types", "llama-gqa", "--device", "cpu",
                 "--output", str(tmp_path / "bad")]) == 2


def test_bench_generate_padded_cache_rows(tmp_path, capsys):
    """--cache-head-multiple 1 8: a tpa-pad8 row beside tpa, its cache holding the padded head factors
    (tiny's TPA heads are not a multiple of 8) and generating the same tokens."""
    from tpa import T6Config

    out = tmp_path / "gen"
    rc = main(["bench", "generate", "--preset", "tiny", "--types", "tpa", "mha", "--cache-head-multiple", "1", "8",
               "--contexts", "12", "--batch-sizes", "2", "--new-tokens", "3", "--short-tokens", "1",
               "--device", "cpu", "--output", str(out)])
    assert rc == 0
    rows = {r["attention_type"]: r for r in json.loads((out / "generate.json").read_text())["rows"]}
    assert list(rows) == ["tpa", "tpa-pad8", "mha"] and all(r["status"] == "ok" for r in rows.values())
    cfg = T6Config.from_preset("tiny", "tpa")
    assert cfg.num_attention_heads % 8  # else the padded row pads nothing
    extra = (cfg.k_rank + cfg.v_rank) * (-(-cfg.num_attention_heads // 8) * 8 - cfg.num_attention_heads)
    tokens = 2 * (12 + 3)
    assert rows["tpa-pad8"]["kv_cache_bytes"] - rows["tpa"]["kv_cache_bytes"] == (
        extra * cfg.num_hidden_layers * 4 * tokens)  # float32 on the CPU
    assert rows["tpa-pad8"]["predicted_kv_cache_bytes"] == rows["tpa-pad8"]["kv_cache_bytes"]
    assert "| tpa-pad8 |" in (out / "generate.md").read_text()
    assert main(["bench", "generate", "--preset", "tiny", "--types", "mha", "--cache-head-multiple", "16",
                 "--device", "cpu", "--output", str(out)]) == 2
    assert "--types has neither" in capsys.readouterr().err
    assert main(["bench", "generate", "--preset", "tiny", "--types", "tpa", "--cache-head-multiple", "0",
                 "--device", "cpu", "--output", str(out)]) == 2
    assert "integers >= 1" in capsys.readouterr().err


def test_bench_generate_time_budget_and_errors(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["bench", "generate", "--preset", "tiny", "--types", "mqa", "--contexts", "8", "--batch-sizes", "1",
                 "--new-tokens", "2", "--time-budget", "0", "--device", "cpu", "--output", str(out)]) == 0
    rows = json.loads((out / "generate.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped (time budget)"]
    assert main(["bench", "generate", "--preset", "nano", "--output", str(out)]) == 2
    assert "unknown preset 'nano'" in capsys.readouterr().err
    assert main(["bench", "generate", "--preset", "tiny", "--contexts", "4Q", "--output", str(out)]) == 2
    assert "context length" in capsys.readouterr().err
    assert main(["bench", "generate", "--preset", "tiny", "--device", "cpu", "--cuda-graphs", "--output", str(out)]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


def test_chunked_prefill_then_generate_equals_plain_generate():
    """The benchmark's prefill-in-chunks route produces the tokens plain generate() produces."""
    from tpa import T6Cache, T6Config, T6ForCausalLM

    for t in ("tpa", "mla", "gqa"):
        cfg = T6Config.from_preset("tiny", t, vocab_size=97, num_hidden_layers=2, initializer_range=0.2)
        model = T6ForCausalLM(cfg).eval()
        ids = torch.randint(0, 97, (2, 45))
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=0)
        cache = T6Cache.for_model(model, 2, capacity=50)
        with torch.no_grad():
            for piece in ids[:, :-1].split(16, dim=1):
                model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=5,
                             min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref), t


def test_bench_train_compile_mode_reaches_torch_compile_and_the_table(tmp_path, monkeypatch):
    import torch

    seen, marks = [], []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or real_compile(model, **kw))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    out = tmp_path / "train"
    rc = main(["bench", "train", "--preset", "tiny", "--data", str(tmp_path / "none"), "--loops", "model-compile",
               "--reference", "none", "--types", "mqa", "--steps", "2", "--warmup", "1", "--micro-batch", "1",
               "--seq-len", "8", "--vocab-size", "128", "--compile-backend", "aot_eager", "--device", "cpu",
               "--compile-mode", "reduce-overhead", "--output", str(out)])
    assert rc == 0
    assert seen == [{"backend": "aot_eager", "mode": "reduce-overhead"}]
    assert len(marks) == 3  # one new cudagraph-trees step per training step
    (row,) = json.loads((out / "train.json").read_text())["rows"]
    assert row["status"] == "ok" and row["compile_mode"] == "reduce-overhead"
    assert 'torch.compile(model, mode="reduce-overhead")' in (out / "train.md").read_text()
