"""What a user of HF models expects of T6 beyond generate(): the exported tokenizer, output options,
Auto classes, assisted and prompt-lookup decoding, gradient checkpointing."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer

from tpa.models.t6 import T6Cache, T6Config, T6ForCausalLM, T6ForSequenceClassification, T6Model
from tpa.models.t6 import save_model_and_tokenizer
from tpa.models.t6.hf_compat import output_cache
from models.test_hf import VOCAB, train_tokenizer


def tiny(attention_type="tpa", num_hidden_layers=2, **kw):
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=num_hidden_layers,
                               initializer_range=0.2, pad_token_id=0, **kw)
    return T6ForCausalLM(cfg).eval()

TYPES = ["tpa", "mha", "mla"]


def test_exported_tokenizer_pads_left_and_knows_the_context(tmp_path):
    tokenizer = train_tokenizer(vocab_size=300)
    assert tokenizer.padding_side == "right"  # what a fresh tokenizer does: the export must change it
    model = T6ForCausalLM(T6Config.from_preset("tiny", vocab_size=len(tokenizer), num_hidden_layers=2,
                                               initializer_range=0.2, max_position_embeddings=48)).eval()
    save_model_and_tokenizer(model, tokenizer, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left" and tok.model_max_length == 48
    assert len(tok("to be " * 100, truncation=True)["input_ids"]) == 48
    # the README's batched example: each prompt's continuation equals the prompt's alone
    prompts = ["To be, or not", "Whether 'tis nobler in the mind"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for i, prompt in enumerate(prompts):
        alone = tok(prompt, return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[i, -6:], single[0, -6:])


@pytest.mark.parametrize("attention_type", TYPES)
def test_output_hidden_states_attentions_and_tuples(attention_type):
    model = tiny(attention_type)
    ids = torch.randint(1, VOCAB, (2, 6))
    out = model(ids, output_hidden_states=True, output_attentions=True)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert len(out.hidden_states) == layers + 1 and all(h.shape == (2, 6, 128) for h in out.hidden_states)
    assert torch.equal(model.lm_head(out.hidden_states[-1]), out.logits)
    assert len(out.attentions) == layers and out.attentions[0].shape == (2, heads, 6, 6)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(2, heads, 6), atol=1e-5)
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
    plain = model(ids)
    assert plain.hidden_states is None and plain.attentions is None
    assert torch.allclose(plain.logits, out.logits, atol=1e-5)  # the explicit-weights path computes the same
    as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)
    assert isinstance(as_tuple[1], T6Cache)  # config.use_cache is True, as in LlamaForCausalLM
    base_tuple = model.model(ids, return_dict=False, use_cache=False)
    assert isinstance(base_tuple, tuple) and len(base_tuple) == 1


@pytest.mark.parametrize("attention_type", TYPES)
def test_attention_weights_with_a_padded_cache_are_per_input_column(attention_type):
    """With a cache the weights span past + new columns (zero at padding), as transformers returns them."""
    model = tiny(attention_type)
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    prefill = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, output_attentions=True)
    step = model(ids[:, 5:], attention_mask=mask, cache=output_cache(prefill), output_attentions=True)
    full = model(ids, attention_mask=mask, use_cache=False, output_attentions=True)
    weights = step.attentions[0]
    assert weights.shape == (2, model.config.num_attention_heads, 2, 7)
    assert torch.all(weights[0, :, :, :3] == 0)
    assert torch.allclose(weights, full.attentions[0][:, :, 5:], atol=1e-5)


def test_output_attentions_with_a_static_cache_is_a_clear_error():
    model = tiny("tpa")
    cache = T6Cache.for_model(model, 1, capacity=16, static=True)
    with pytest.raises(ValueError, match="output_attentions=True needs a dynamic cache"):
        model(torch.randint(1, VOCAB, (1, 4)), cache=cache, output_attentions=True)


def test_cache_follows_config_use_cache_except_in_training():
    model = tiny("tpa")
    ids = torch.randint(1, VOCAB, (1, 4))
    assert isinstance(output_cache(model(ids)), T6Cache)
    assert output_cache(model(ids, use_cache=False)) is None
    model.config.use_cache = False
    assert output_cache(model(ids)) is None
    model.config.use_cache = True
    model.train()
    assert output_cache(model(ids)) is None  # a training step keeps no copy of its keys and values
    with torch.no_grad():
        assert isinstance(output_cache(model(ids)), T6Cache)


def test_gradient_checkpointing_goes_through_transformers_layer():
    model = tiny("tpa", num_hidden_layers=2)
    assert all(isinstance(block, GradientCheckpointingLayer) for block in model.model.layers)
    ids = torch.randint(1, VOCAB, (2, 8))
    model.train()
    ref = model(ids, labels=ids).loss
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # 5.24 renamed it
    enable()
    calls = []
    model.model.layers[0]._gradient_checkpointing_func = lambda fn, *a: calls.append(1) or fn(*a)
    loss = model(ids, labels=ids, use_cache=True).loss  # the cache is dropped (with a warning) under checkpointing
    loss.backward()
    assert calls == [1] and torch.allclose(loss, ref)
    model.model.layers[0]._gradient_checkpointing_func = model.model.layers[1]._gradient_checkpointing_func
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_auto_model_and_sequence_classification_from_a_saved_directory(tmp_path):
    model = tiny("mla")
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is T6Model
    ids = torch.randint(1, VOCAB, (2, 5))
    assert torch.allclose(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(clf) is T6ForSequenceClassification
    ids[0, 3:] = 0  # pad_token_id = 0: the first row is scored at its last real token (column 2)
    out = clf(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    hidden = clf.model(ids).last_hidden_state
    assert torch.allclose(out.logits[0], clf.score(hidden[0, 2]), atol=1e-5)
    assert torch.allclose(out.logits[1], clf.score(hidden[1, -1]), atol=1e-5)


def test_auto_classes_without_importing_tpa(tmp_path):
    T6ForSequenceClassification(tiny("tpa").config).save_pretrained(tmp_path)
    code = (
        "import sys; from transformers import AutoModel, AutoModelForSequenceClassification;"
        f"p = {str(tmp_path)!r};"
        "print(type(AutoModel.from_pretrained(p, trust_remote_code=True)).__name__,"
        " type(AutoModelForSequenceClassification.from_pretrained(p, trust_remote_code=True)).__name__,"
        " 'tpa' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["T6Model", "T6ForSequenceClassification", "True"]


@pytest.mark.parametrize("attention_type", TYPES)
def test_assisted_and_prompt_lookup_decoding_equal_plain_greedy(attention_type):
    model, assistant = tiny(attention_type), tiny(attention_type, num_hidden_layers=1)
    ids = torch.randint(1, VOCAB, (1, 9))
    ids[0, 5:8] = ids[0, 1:4]  # a repeated n-gram, so prompt lookup proposes drafts
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assisted = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    lookup = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, plain) and torch.equal(lookup, plain)


@pytest.mark.parametrize("attention_type", TYPES)
def test_cropping_a_ragged_cache_equals_never_having_seen_the_tokens(attention_type):
    model = tiny(attention_type)
    ids = torch.randint(1, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0  # ragged: left padding of different widths
    cache = output_cache(model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True))
    model(ids[:, 6:9], attention_mask=mask[:, :9], cache=cache)  # three draft columns, rejected
    assert cache.is_croppable
    cache.crop(-3)
    assert cache.get_seq_length() == 6
    cropped = model(ids[:, 6:], attention_mask=mask, cache=cache).logits
    fresh = output_cache(model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True))
    ref = model(ids[:, 6:], attention_mask=mask, cache=fresh).logits
    assert torch.allclose(cropped, ref, atol=1e-5)
    cache.crop(4)  # a positive value is the number of columns to keep (older transformers' convention)
    assert cache.get_seq_length() == 4 and cache.kv.seqlens.tolist() == [0, 4, 3]
    with pytest.raises(ValueError, match="cannot crop a cache of 4 input columns to 5"):
        cache.crop(5)


def test_a_static_cache_is_not_croppable_and_says_so():
    model = tiny("tpa")
    cache = T6Cache.for_model(model, 1, capacity=16, static=True)
    model(torch.randint(1, VOCAB, (1, 4)), cache=cache)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="static T6 cache cannot be cropped"):
        cache.crop(-1)


def test_auto_causal_lm_still_loads(tmp_path):
    tiny("gqa").save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is T6ForCausalLM
