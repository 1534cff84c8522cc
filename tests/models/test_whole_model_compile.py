"""The user's own loop: ``torch.compile(model)`` with the loss inside ``forward`` trains in one graph,
compiles once, and its generated code evaluates no sine or cosine (the RoPE tables are gathered)."""

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import tpa
from tpa import T6Config, T6ForCausalLM

VOCAB = 64


def small_model(attention_type, layers=2):
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=layers, hidden_size=64,
                               intermediate_size=96, max_position_embeddings=32)
    return T6ForCausalLM(cfg).train()


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_whole_model_compile_trains_in_one_graph_without_recompiling(attention_type):
    """Train mode, bf16 autocast, backward, clipping and AdamW steps: one frame compiled once, no graph
    break (fullgraph), no recompilation across steps (dynamo would raise), losses equal to eager's."""
    torch._dynamo.reset()
    counters.clear()
    model = small_model(attention_type)
    reference = small_model(attention_type)
    reference.load_state_dict(model.state_dict())
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            ids = torch.randint(0, VOCAB, (2, 16))
            losses = []
            for fn, m, opt in zip((compiled, reference), (model, reference), optimizers):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = fn(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            assert torch.allclose(losses[0], losses[1], rtol=1e-2, atol=1e-2), losses
    assert backend.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_whole_model_inductor_code_evaluates_no_cosine_or_sine():
    """Inductor's forward and backward code of a training step under ``torch.compile(model)``.

    RoPE angles formed inside the graph get fused into every layer's rotation kernel (four cos/sin per
    layer per step on a GPU before the tables); gathered table rows leave none at all.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = small_model("mha", layers=2)
    compiled = torch.compile(model)
    ids = torch.randint(0, VOCAB, (2, 16))

    def step():
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    with inductor_config.patch({"cpp.vec_isa_ok": False}):  # scalar C++: the same kernels, compiled faster
        _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert len(codes) == 2 and code.count("extern \"C\"") >= 4  # forward and backward kernels were generated
    assert re.findall(r"\b(?:cos|sin)\b", code) == []
