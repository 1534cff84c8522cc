"""The user's own loop: ``torch.compile(model)`` with the loss inside ``forward`` trains in one graph,
compiles once, and its generated code evaluates no sine or cosine (the RoPE tables are gathered)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import tpa
from _helpers import REPO, subprocess_env
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


# run in a fresh process: inductor's scalar C++ (faster to compile) must not leak into later compiles
_INDUCTOR_CODE = """
import json, re, torch
from torch._inductor import config
from torch._inductor.utils import run_and_get_code
from tests.models.test_whole_model_compile import VOCAB, small_model

config.cpp.vec_isa_ok = False
torch.manual_seed(0)
compiled = torch.compile(small_model("mha", layers=2))
ids = torch.randint(0, VOCAB, (2, 16))

def step():
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss

_, codes = run_and_get_code(step)
code = "\\n".join(codes)
print(json.dumps({"graphs": len(codes), "kernels": code.count('extern "C"'),
                  "transcendentals": re.findall(r"\\b(?:cos|sin)\\b", code)}))
"""


@pytest.mark.slow
def test_whole_model_inductor_code_evaluates_no_cosine_or_sine(tmp_path):
    """Inductor's forward and backward code of a training step under ``torch.compile(model)``.

    RoPE angles formed inside the graph get fused into every layer's rotation kernel (four cos/sin per
    layer per step on a GPU before the tables); gathered table rows leave none at all.
    """
    env = subprocess_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # the child imports this module
    done = subprocess.run([sys.executable, "-c", _INDUCTOR_CODE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["graphs"] == 2 and found["kernels"] >= 4  # forward and backward kernels were generated
    assert found["transcendentals"] == []


def test_whole_model_compile_with_an_attention_mask_has_no_graph_break():
    """A loop that passes the tokenizer's ``attention_mask`` (all ones, then left padding): still one
    graph compiled once, losses equal to eager's (the padded one with its padding labels ignored)."""
    torch._dynamo.reset()
    model = small_model("tpa")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = torch.randint(0, VOCAB, (2, 16))
    padded = torch.ones_like(ids)
    padded[1, :5] = 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for mask in (torch.ones_like(ids), padded):
            labels = ids.masked_fill(mask == 0, -100)
            loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            assert torch.allclose(loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss, atol=1e-5)
    assert backend.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("attention_type", ["mha", "tpa"])
def test_whole_model_triton_code_evaluates_no_cosine_or_sine(attention_type):
    """The CUDA twin of the CPU check: inductor's Triton kernels of a bf16-autocast training step."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(small_model(attention_type).cuda())
    ids = torch.randint(0, VOCAB, (2, 16), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert len(codes) == 2 and "@triton.jit" in code
    assert re.findall(r"\b(?:cos|sin)\b", code) == []
