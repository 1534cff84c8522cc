"""T6 as a transformers model: generate() with the factor cache, save/load, Auto classes, tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

import tpa
from tpa import T6Config, T6ForCausalLM
from tpa.models.t6 import load_model_and_tokenizer, save_model_and_tokenizer
from tpa.models.t6.hf_compat import output_cache

VOCAB = 101


def tiny(attention_type="tpa", **kw):
    # a larger init spread makes a random model's greedy choices depend on the context
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=2,
                               initializer_range=0.2, pad_token_id=0, **kw)
    return T6ForCausalLM(cfg).eval()


def greedy(model, ids, **kw):
    return model.generate(ids, max_new_tokens=8, do_sample=False, **kw)


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_greedy_with_cache_equals_without(attention_type):
    model = tiny(attention_type)
    ids = torch.randint(1, VOCAB, (2, 9))
    a = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    b = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, output_scores=True,
                       return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    assert len(set(a.sequences[0, 9:].tolist())) > 1, "test model too degenerate to discriminate"
    for sa, sb in zip(a.scores, b.scores):
        assert torch.allclose(sa, sb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_left_padded_batch_equals_one_by_one(attention_type):
    model = tiny(attention_type)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batch = greedy(model, ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = greedy(model, p[None])
        assert torch.equal(batch[i, width:], alone[0, len(p):])


def test_sampling_options_and_max_new_tokens():
    model = tiny()
    ids = torch.randint(1, VOCAB, (2, 5))
    torch.manual_seed(1)
    a = model.generate(ids, max_new_tokens=7, do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    torch.manual_seed(1)
    b = model.generate(ids, max_new_tokens=7, do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    assert a.shape == (2, 12) and torch.equal(a, b)
    torch.manual_seed(2)
    c = model.generate(ids, max_new_tokens=7, do_sample=True, temperature=5.0)
    assert c.shape == (2, 12)


def test_generation_stops_at_eos():
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 6))
    free = greedy(model, ids)
    eos = int(free[0, 6 + 3])  # the 4th generated token
    first = free[0, 6:].tolist().index(eos)
    stopped = greedy(model, ids, eos_token_id=eos)
    assert stopped.shape[1] == 6 + first + 1 and int(stopped[0, -1]) == eos


def test_beam_search_runs_with_factor_cache():
    model = tiny()
    out = model.generate(torch.randint(1, VOCAB, (2, 5)), max_new_tokens=4, num_beams=3, do_sample=False)
    assert out.shape == (2, 9)


def test_cache_measured_elements_match_table1():
    model = tiny("tpa")
    out = model(torch.randint(1, VOCAB, (1, 4)), use_cache=True)
    cfg = model.config
    expected = (cfg.k_rank + cfg.v_rank) * (cfg.num_attention_heads + cfg.head_dim)
    assert output_cache(out).elements_per_token() == [expected] * cfg.num_hidden_layers
    assert isinstance(output_cache(out), tpa.T6Cache)
    assert sorted(output_cache(out).kv.layers[0].buffers) == ["a_k", "a_v", "b_k", "b_v"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attention_type", ["tpa", "mla"])
def test_save_load_round_trip_bitwise(tmp_path, dtype, attention_type):
    model = tiny(attention_type).to(dtype)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "t6"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert isinstance(loaded, T6ForCausalLM)
    ref, new = model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys()
    for k in ref:
        assert new[k].dtype == dtype and torch.equal(ref[k], new[k]), k
    ids = torch.randint(1, VOCAB, (1, 7))
    assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_auto_config_after_import():
    cfg = AutoConfig.for_model("t6", attention_type="gqa", num_attention_heads=8, num_key_value_heads=4)
    assert isinstance(cfg, T6Config)
    assert isinstance(AutoModelForCausalLM.from_config(tiny().config), T6ForCausalLM)


def test_remote_code_loading_without_importing_tpa(tmp_path):
    """Tools that never import tpa (lm_eval --model hf) load a saved directory via auto_map."""
    tiny("tpa").save_pretrained(tmp_path)
    code = (
        "import sys; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True);"
        "print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("T6ForCausalLM")


def test_loading_another_model_type_is_a_clear_error(tmp_path):
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="'llama' model, not a T6"):
        T6ForCausalLM.from_pretrained(tmp_path)


def train_tokenizer(vocab_size=VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_tokenizer_travels_with_the_model(tmp_path):
    tokenizer = train_tokenizer(vocab_size=300)
    model = T6ForCausalLM(T6Config.from_preset("tiny", vocab_size=len(tokenizer), num_hidden_layers=1))
    save_model_and_tokenizer(model, tokenizer, tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded_tok, PreTrainedTokenizerFast)
    text = "To be, or not to be: that is the question!"
    assert loaded_tok.decode(loaded_tok(text)["input_ids"]) == text
    model2, tok2 = load_model_and_tokenizer(tmp_path)
    assert model2.config.eos_token_id == tok2.eos_token_id


def test_mismatched_tokenizer_vocabulary_is_a_clear_error(tmp_path):
    tokenizer = train_tokenizer(vocab_size=300)
    model = T6ForCausalLM(T6Config.from_preset("tiny", vocab_size=100, num_hidden_layers=1))
    with pytest.raises(ValueError, match="vocab_size is 100"):
        save_model_and_tokenizer(model, tokenizer, tmp_path)
    assert not os.path.exists(tmp_path / "config.json")


def test_prompt_longer_than_max_positions_is_a_clear_error():
    model = tiny(max_position_embeddings=12)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.randint(1, VOCAB, (1, 13)), max_new_tokens=2, do_sample=False)
