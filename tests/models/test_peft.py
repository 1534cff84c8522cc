"""LoRA adapters on T6 with peft: the README's target modules per attention type train, save, reload
and merge."""

import pytest
import torch

from tpa.models.t6 import T6Config, T6ForCausalLM
from tpa.models.t6.hf_compat import cache_kwargs, output_cache

peft = pytest.importorskip("peft", reason="peft is in the `test` extra")

VOCAB = 101
# the README's table: the attention projections to target for each attention type (plus the MLP's
# gate_up_proj/down_proj, which every type has)
TARGETS = {
    "tpa": ["proj", "o_proj"],
    "mha": ["qkv_proj", "o_proj"],
    "mla": ["q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj"],
}


def base_model(attention_type: str) -> T6ForCausalLM:
    torch.manual_seed(0)
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=2, initializer_range=0.2)
    return T6ForCausalLM(cfg)


@pytest.mark.parametrize("attention_type", list(TARGETS))
def test_lora_trains_saves_reloads_and_merges(attention_type, tmp_path):
    targets = TARGETS[attention_type] + ["gate_up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base_model(attention_type), config)
    wrapped = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1, VOCAB, (4, 12))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    probe = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        tuned = model(input_ids=probe).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    reloaded = peft.PeftModel.from_pretrained(base_model(attention_type), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=probe).logits, tuned, atol=1e-5)
        # unmerged adapters reach cached decoding too (MLA's absorbed path reads the adapted kv_b_proj)
        prefill = reloaded(input_ids=probe[:, :6], use_cache=True)
        step = reloaded(input_ids=probe[:, 6:], **cache_kwargs(output_cache(prefill))).logits
        assert torch.allclose(step, tuned[:, 6:], atol=1e-4)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, T6ForCausalLM)
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        assert torch.allclose(merged(input_ids=probe).logits, tuned, atol=1e-4)
        plain = base_model(attention_type).eval()(input_ids=probe).logits
        assert not torch.allclose(plain, tuned, atol=1e-3)  # the adapter changed the model
        # the merged model decodes with its cache like any T6 model
        out = merged.generate(probe[:1], max_new_tokens=4, do_sample=False)
        ref = merged.generate(probe[:1], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out, ref)
