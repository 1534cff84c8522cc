"""Code the tensor-parallel tests run in each spawned gloo rank (importable by spawned processes)."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tpa import T6Config, T6ForCausalLM
from tpa.models.t6.cache_t6 import T6Cache
from tpa.models.t6.hf_compat import output_cache

VOCAB = 67
# every attention type, with the options a sharding can get wrong (gate, head norm, partial RoPE, ...)
# (awkward sizes: 6 heads, 3 per rank; odd factor ranks; a SwiGLU width of 47 per rank)
CASES = {
    "tpa": dict(attention_type="tpa", attention_head_norm=True, rope_partial_factor=0.5, attention_output_gate=True,
                tpa_head_activation="sigmoid", num_attention_heads=6, q_rank=5, k_rank=3, v_rank=1),
    # head factors cached padded to 16 heads (3 per rank: 16 stored)
    "tpa-padded-cache": dict(attention_type="tpa", num_attention_heads=6, k_rank=3, v_rank=1,
                             tpa_cache_head_multiple=16),
    "tpa-factors-share-kv-b": dict(attention_type="tpa", attn_impl="factors", tpa_share_kv_b=True),
    "tpa-order3": dict(attention_type="tpa", tpa_order=3, tpa_c_dim=2),
    "tpa_kvonly": dict(attention_type="tpa_kvonly", attention_head_norm=True),
    "mha": dict(attention_type="mha", attention_output_gate=True),
    "gqa": dict(attention_type="gqa", num_attention_heads=6, num_key_value_heads=2, attention_head_norm=True),
    "mqa": dict(attention_type="mqa", rope_partial_factor=0.5),
    "mla": dict(attention_type="mla", v_head_dim=12, attention_head_norm=True),
    "mla-no-q-lora": dict(attention_type="mla", q_lora_rank=0, mla_absorb=False),
}

# the cases with shared rows in a fused projection: B (and C) factors, K/V heads fewer than the ranks
SHARD_SHARED_CASES = ["tpa", "tpa-factors-share-kv-b", "tpa-order3", "mqa"]


def tiny_config(**options) -> T6Config:
    base = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                intermediate_size=94, q_rank=3, k_rank=2, v_rank=2, kv_lora_rank=20, q_lora_rank=24,
                qk_rope_head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    base.update(options)
    return T6Config(**base)


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (zeros for none) under the single-process names (collective: every
    rank calls it)."""
    from tpa.parallel import to_plain

    return to_plain(model, {fqn: full(p.grad) if p.grad is not None else torch.zeros(p.shape)
                            for fqn, p in model.named_parameters()})[0]


def full_params(model) -> dict[str, torch.Tensor]:
    from tpa.parallel import to_plain

    return to_plain(model, {fqn: full(p.detach()) for fqn, p in model.named_parameters()})[0]


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def decode_logits(model, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], T6Cache]:
    """Prefill ``ids`` into a fresh cache, then feed ``steps`` tokens one at a time; the logits of every call."""
    cache = T6Cache.for_model(model, ids.shape[0])
    out = model(input_ids=ids, cache=cache, use_cache=True)
    logits = [out.logits]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        out = model(input_ids=nxt, cache=output_cache(out), use_cache=True)
        logits.append(out.logits)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return logits, cache


def check_case(name: str, mesh, shard_shared: bool = False) -> None:
    from tpa.parallel import apply_tensor_parallel

    torch.manual_seed(0)
    config = tiny_config(**CASES[name])
    ref = T6ForCausalLM(config).float().eval()
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh, shard_shared=shard_shared)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))

    # forward and backward without a cache
    want = ref(input_ids=ids, labels=ids)
    got = model(input_ids=ids, labels=ids)
    close(got.logits, want.logits, f"{name} logits")
    want.loss.backward()
    got.loss.backward()
    ref_params = dict(ref.named_parameters())
    assert all(p.grad is not None for p in model.parameters()), name
    grads, params = full_grads(model), full_params(model)
    assert grads.keys() == ref_params.keys(), name
    for fqn, grad in grads.items():
        assert torch.equal(params[fqn], ref_params[fqn].detach()), f"{name}: {fqn} is not the single-process weight"
        close(grad, ref_params[fqn].grad, f"{name} grad {fqn}")
    check_fused_shards(name, config, model, mesh.size(), shard_shared)
    check_attention_weights(name, ref, model, ids)

    # cached decoding: every step's logits, and greedy generate() picks the same tokens
    with torch.no_grad():
        want_steps, ref_cache = decode_logits(ref, ids, 3)
        got_steps, cache = decode_logits(model, ids, 3)
        for i, (g, w) in enumerate(zip(got_steps, want_steps)):
            close(g, w, f"{name} cached step {i}")
        want_ids = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
        got_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=0)
        assert torch.equal(got_ids, want_ids), name
        if name == "tpa":  # a static cache (fixed capacity, device-side planning of one-token steps) too
            static_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                        pad_token_id=0, cache_implementation="static")
            assert torch.equal(static_ids, want_ids), name
    check_cache_size(name, config, ref_cache, cache, mesh.size())
    return ref


def check_fused_shards(name: str, config: T6Config, model, n: int, shard_shared: bool) -> None:
    """Each rank holds 1/N of the head rows of every fused projection and all of its shared rows (1/N of
    them too with ``shard_shared``)."""
    h, d, c = config.num_attention_heads, config.head_dim, config.hidden_size
    layer = model.model.layers[0]
    if config.attention_type in ("tpa", "tpa_kvonly"):
        ranks = {"q": config.q_rank, "k": config.k_rank, "v": config.v_rank}
        kinds = "kv" if config.attention_type == "tpa_kvonly" else "qkv"
        features = d // config.tpa_c_dim if config.tpa_order == 3 else d
        head_rows = sum(ranks[k] * h for k in kinds) + (h * d if "q" not in kinds else 0)
        head_rows += h * d if config.attention_output_gate else 0
        shared = [k for k in kinds if not (k == "v" and config.tpa_share_kv_b)]
        shared_rows = sum(ranks[k] * features for k in shared)
        if config.tpa_order == 3:
            shared_rows += sum(ranks[k] * config.tpa_c_dim for k in kinds)
        attn = layer.self_attn.proj
    elif config.attention_type in ("mha", "gqa", "mqa"):
        g = config.num_key_value_heads
        head_rows, shared_rows = (h * d + 2 * g * d, 0) if g % n == 0 else (h * d, 2 * g * d)
        attn = layer.self_attn.qkv_proj
    else:
        attn = None
    if attn is not None:
        local = sum(p.to_local().numel() for p in attn.parameters())
        want = (head_rows + shared_rows) // n if shard_shared else head_rows // n + shared_rows
        assert local == want * c, (name, local, head_rows, shared_rows)
        assert local < (head_rows + shared_rows) * c, name
    mlp = sum(p.to_local().numel() for p in layer.mlp.gate_up_proj.parameters())
    assert mlp == 2 * config.intermediate_size * c // n, (name, mlp)


def check_attention_weights(name: str, ref, model, ids: torch.Tensor) -> None:
    """output_attentions=True gives the weights of all heads, without and with a cache; the gradients
    through them are one process's."""
    want = ref(input_ids=ids, output_attentions=True)
    got = model(input_ids=ids, output_attentions=True)
    assert len(got.attentions) == len(want.attentions), name
    for i, (g, w) in enumerate(zip(got.attentions, want.attentions)):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        close(g, w, f"{name} attentions {i}")
    if name == "tpa":
        probe = torch.randn(want.attentions[-1].shape, generator=torch.Generator().manual_seed(2))
        for m, out in ((ref, want), (model, got)):
            m.zero_grad()
            (out.attentions[-1] * probe).sum().backward()
        got_grads = full_grads(model)
        for fqn, param in ref.named_parameters():
            if param.grad is None:
                assert not got_grads[fqn].any(), fqn
            else:
                close(got_grads[fqn], param.grad, f"{name} grad through attentions {fqn}")
    with torch.no_grad():
        cache = T6Cache.for_model(model, ids.shape[0])
        ref_cache = T6Cache.for_model(ref, ids.shape[0])
        model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
        ref(input_ids=ids[:, :-1], cache=ref_cache, use_cache=True)
        got = model(input_ids=ids[:, -1:], cache=cache, use_cache=True, output_attentions=True)
        want = ref(input_ids=ids[:, -1:], cache=ref_cache, use_cache=True, output_attentions=True)
        for i, (g, w) in enumerate(zip(got.attentions, want.attentions)):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            close(g, w, f"{name} cached attentions {i}")


def check_compiled_blocks(mesh) -> None:
    """Compiled blocks (what `tpa train --compile` does) give the logits and gradients of one process;
    ``aot_eager`` traces what inductor traces (autograd functions with collectives, DTensor.to_local)
    without its slow C++ builds on CPUs."""
    from tpa.parallel import apply_tensor_parallel

    torch.manual_seed(0)
    ref = T6ForCausalLM(tiny_config(**CASES["tpa"])).float()
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh, shard_shared=True)
    for block in model.model.layers:
        block.compile(backend="aot_eager")
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    want, got = ref(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    close(got.logits, want.logits, "compiled logits")
    want.loss.backward()
    got.loss.backward()
    grads = full_grads(model)
    for fqn, param in ref.named_parameters():
        close(grads[fqn], param.grad, f"compiled grad {fqn}")


def check_checkpoint_loads_into_tp(ref, mesh, path: str, shard_shared: bool = False) -> None:
    """A DCP checkpoint of the single-process model loads into the TP model (parameter names and global
    shapes are unchanged), and one written from the TP model holds the single-process weights."""
    import torch.distributed.checkpoint as dcp

    from tpa.parallel import apply_tensor_parallel

    from tpa.parallel import from_plain, to_plain

    dcp.save(ref.state_dict(), checkpoint_id=f"{path}/plain")
    fresh = T6ForCausalLM(ref.config).float()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    model = apply_tensor_parallel(fresh, mesh, shard_shared=shard_shared)
    own = model.state_dict()
    state, _ = to_plain(model, own)
    dcp.load(state, checkpoint_id=f"{path}/plain")
    model.load_state_dict(from_plain(model, state, None, own)[0])
    want = ref.state_dict()
    assert full_params(model).keys() == dict(ref.named_parameters()).keys()
    for fqn, value in full_params(model).items():
        assert torch.equal(value, want[fqn]), fqn
    dcp.save(to_plain(model, model.state_dict())[0], checkpoint_id=f"{path}/tp")
    plain = {k: torch.zeros_like(v) for k, v in want.items()}
    dcp.load(plain, checkpoint_id=f"{path}/tp")
    assert all(torch.equal(plain[k], want[k]) for k in want)


def check_cache_size(name: str, config: T6Config, ref_cache: T6Cache, cache: T6Cache, n: int) -> None:
    """The per-rank cache holds the local heads' factors and the full shared ones."""
    got, want = cache.elements_per_token(), ref_cache.elements_per_token()
    h, d = config.num_attention_heads, config.head_dim
    if config.attention_type == "tpa" and config.tpa_order == 2 and not config.tpa_share_kv_b:
        ranks = config.k_rank + config.v_rank
        assert want == [ranks * (h + d)] * config.num_hidden_layers, want
        assert got == [ranks * (h // n + d)] * config.num_hidden_layers, (name, got)
        multiple = config.tpa_cache_head_multiple
        stored = [ranks * (-(-(h // n) // multiple) * multiple + d)] * config.num_hidden_layers
        assert cache.stored_elements_per_token() == stored, (name, cache.stored_elements_per_token())
    elif config.attention_type in ("mha", "gqa", "mqa"):
        g = config.num_key_value_heads
        local = g // n if g % n == 0 else 1
        assert got == [2 * local * d] * config.num_hidden_layers, (name, got)
    elif config.attention_type == "mla":
        assert got == want, (name, got, want)  # the latent and the RoPE key are replicated


def run_cases(rank: int, world: int, port: int, names: list[str], ckpt_dir: str, errors: bool = False) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for name in names:
            ref = check_case(name, mesh)
            if name in ("tpa", "mla", "gqa", "mqa"):
                check_checkpoint_loads_into_tp(ref, mesh, f"{ckpt_dir}/{name}")
        for name in SHARD_SHARED_CASES:  # the shared rows of the fused projections sharded too
            ref = check_case(name, mesh, shard_shared=True)
            if name in ("tpa", "mqa"):
                check_checkpoint_loads_into_tp(ref, mesh, f"{ckpt_dir}/{name}-shard-shared", shard_shared=True)
        check_compiled_blocks(mesh)
        if errors:
            check_errors(mesh)
    finally:
        dist.destroy_process_group()


def check_errors(mesh) -> None:
    """Clear errors for what TP cannot split, before anything in the model changes."""
    from tpa.parallel import apply_tensor_parallel

    for options, message in [
        (dict(attention_type="tpa", num_attention_heads=3), "num_attention_heads divisible by 2, got 3"),
        # the medium preset's TPA head count: the message says what would work
        (dict(attention_type="tpa", num_attention_heads=47), "47 is prime: only --tp 47 splits it); the nearest "
                                                             "values that 2 divides are 46 or 48"),
        (dict(attention_type="tpa", num_attention_heads=9), "the TP sizes that split it: 3, 9"),
        (dict(attention_type="mha", intermediate_size=95), "intermediate_size divisible by 2, got 95"),
        (dict(attention_type="tpa", tpa_head_activation="softmax", attention_head_norm=True), "softmax"),
        (dict(attention_type="tpa", tpa_contextual_b=False, attention_head_norm=True), "contextual"),
        (dict(attention_type="gqa", num_attention_heads=6, num_key_value_heads=3), "num_key_value_heads=3"),
    ]:
        model = T6ForCausalLM(tiny_config(**options))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            apply_tensor_parallel(model, mesh)
        except ValueError as err:
            assert message in str(err), (message, str(err))
        else:
            raise AssertionError(f"no error for {options}")
        after = model.state_dict()  # nothing was changed before the error
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert not any(isinstance(p, DTensor) for p in model.parameters())
