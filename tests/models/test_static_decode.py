"""Static, graph-safe decoding: a static T6Cache gives the dynamic cache's results, plans one-token
steps without host syncs or data-dependent shapes, and the graph-replay wrapper (DecodeGraph, with
an eager stand-in for the CUDA capture on the CPU) gives the same tokens again."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tpa
from tests.ops.kernels import needs_cpu_kernels
from tpa import T6Cache, T6Config, T6ForCausalLM
from tpa.models.t6.decode_graph import DecodeGraph
from tpa.models.t6.hf_compat import cache_kwargs, output_cache

VOCAB = 101


def tiny(attention_type="tpa", layers=2, **kw):
    # a larger init spread makes a random model's greedy choices depend on the context
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=layers,
                               initializer_range=0.2, pad_token_id=0, **kw)
    return T6ForCausalLM(cfg).eval()


def left_padded(lengths=(4, 9, 6)):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:], mask[i, width - n:] = torch.randint(1, VOCAB, (n,)), 1
    return ids, mask


GREEDY = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)


def assert_same_generation(ref, out):
    assert torch.equal(ref.sequences, out.sequences)
    assert len(ref.scores) == len(out.scores)
    for a, b in zip(ref.scores, out.scores):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


class EagerReplay(DecodeGraph):
    """DecodeGraph with the CUDA capture replaced by its eager meaning: a capture runs the step's
    Python but none of its kernels (the cache's device tensors are left as they were), a replay runs
    the kernels again on the static inputs and none of the Python."""

    def _record(self, run, undo):
        for _ in range(self.warmup_steps):
            run()
            undo()
        kv = self._cache().kv
        lengths = kv.seqlens.clone()
        out = run()
        kv.seqlens.copy_(lengths)  # the slot it wrote lies beyond the length, as after a real warm-up

        def replay():
            columns = kv.num_columns
            out.copy_(run())
            kv.num_columns = columns

        return replay, out


def with_eager_replay(model, batch, capacity):
    cache = T6Cache.for_model(model, batch, capacity=capacity, static=True)
    assert cache.decode_graph is None  # no CUDA graphs on the CPU
    cache.decode_graph = EagerReplay(cache)
    return cache


# ---------------------------------------------------------------------------------------------- results


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_static_generate_equals_dynamic_left_padded(attention_type):
    model = tiny(attention_type)
    ids, mask = left_padded()
    ref = model.generate(ids, attention_mask=mask, **GREEDY)
    out = model.generate(ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert not output_cache(ref).static
    assert output_cache(out).static and output_cache(out).capacity == 9 + 8 - 1
    assert len(set(ref.sequences[:, 9:].flatten().tolist())) > 2, "test model too degenerate to discriminate"
    assert_same_generation(ref, out)


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_graph_replay_generate_equals_dynamic(attention_type):
    """Through forward's graph dispatch (DecodeGraph with the eager stand-in): the same tokens and scores,
    one capture, one replay per decode step."""
    model = tiny(attention_type)
    ids, mask = left_padded((3, 7))
    ref = model.generate(ids, attention_mask=mask, **GREEDY)
    cache = with_eager_replay(model, 2, capacity=7 + 8)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), **GREEDY)
    assert_same_generation(ref, out)
    graph = cache.decode_graph
    assert (graph.captures, graph.replays) == (1, 7)  # the prompt is eager, then 7 one-token steps
    assert cache.kv.num_columns == 7 + 7 and cache.kv.seqlens.tolist() == [3 + 7, 7 + 7]


def test_graph_step_inputs_are_the_generic_ones(monkeypatch):
    """T6's prepare_inputs_for_generation gives, at every step of a graph-decoded generate() (left
    padding, so positions and mask matter), the inputs transformers' generic method gives; its short
    path serves the one-token steps where transformers passes next_sequence_length=1."""
    import inspect

    from transformers import GenerationMixin

    model = tiny("tpa")
    ids, mask = left_padded((3, 7))
    generic = GenerationMixin.prepare_inputs_for_generation
    ours = T6ForCausalLM.prepare_inputs_for_generation
    steps = []

    def compare(self, input_ids, **kwargs):
        got = ours(self, input_ids, **kwargs)
        want = generic(self, input_ids, **kwargs)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key
            else:
                assert got[key] is value or got[key] == value, key
        steps.append(got["input_ids"]._base is not None)  # the short path hands on a view
        return got

    monkeypatch.setattr(T6ForCausalLM, "prepare_inputs_for_generation", compare)
    monkeypatch.setattr(T6ForCausalLM.prepare_inputs_for_generation, "__signature__", inspect.signature(ours),
                        raising=False)
    ref = model.generate(ids, attention_mask=mask, **GREEDY)
    cache = with_eager_replay(model, 2, capacity=7 + 8)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), **GREEDY)
    assert_same_generation(ref, out)
    if "next_sequence_length" in inspect.signature(generic).parameters:
        assert steps.count(True) == 7  # the 7 one-token steps of the graph-decoded call
    assert cache.decode_graph.replays == 7


@needs_cpu_kernels
@pytest.mark.parametrize("attention_type", ["tpa", "tpa_kvonly"])
def test_static_decode_kernel_path_equals_dynamic(attention_type, monkeypatch):
    """TPA's FlashTPA kernel (Triton, interpreted on the CPU) reads the static cache with device lengths."""
    pytest.importorskip("triton")
    import tpa.layers.tpa as tpa_layer

    model = tiny(attention_type, decode_impl="kernel")
    ids = torch.randint(1, VOCAB, (2, 5))
    kw = dict(GREEDY, max_new_tokens=4)
    ref = model.generate(ids, **kw)
    lengths, original = [], tpa_layer.tpa_decode

    def spy(*args, **kwargs):
        lengths.append(args[6].tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(tpa_layer, "tpa_decode", spy)
    out = model.generate(ids, cache_implementation="static", **kw)
    assert_same_generation(ref, out)
    layers = model.config.num_hidden_layers
    # the 5-token prompt (dynamic plan), then 3 one-token steps (static plan), in every layer
    assert lengths == [[n, n] for n in range(5, 9) for _ in range(layers)]


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_type": "tpa", "tpa_share_kv_b": True},
        {"attention_type": "tpa", "tpa_contextual_b": False},
        {"attention_type": "tpa", "tpa_order": 3, "tpa_c_dim": 2},
        {"attention_type": "tpa", "attn_impl": "factors"},
        {"attention_type": "tpa", "attention_output_gate": True},
        {"attention_type": "mla", "mla_absorb": False},
        {"attention_type": "gqa", "num_key_value_heads": 3},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_static_steps_equal_dynamic_steps_for_variants(overrides):
    overrides = dict(overrides)
    model = tiny(overrides.pop("attention_type"), **overrides)
    ids, mask = left_padded((2, 6))
    steps = torch.randint(1, VOCAB, (2, 5))
    logits = []
    for static in (False, True):
        cache = T6Cache.for_model(model, 2, capacity=12, static=static)
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]]
            for t in range(steps.shape[1]):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                out.append(model(steps[:, t:t + 1], attention_mask=mask[:, : 6 + t + 1], cache=cache,
                                 use_cache=True).logits[:, -1])
        logits.append(torch.stack(out))
        mask = mask[:, :6]
    assert torch.allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_explicit_positions_and_padding_steps():
    """A static one-token step with explicit position_ids, and one whose token is padding (not counted,
    overwritten by the next), equal the dynamic cache's steps."""
    model = tiny("tpa")
    ids = torch.randint(1, VOCAB, (2, 5))
    pos = torch.arange(5).expand(2, 5) + 40
    caches = {s: T6Cache.for_model(model, 2, capacity=10, static=s) for s in (False, True)}
    replay = with_eager_replay(model, 2, capacity=10)
    results = {}
    with torch.no_grad():
        for name, cache in [*caches.items(), ("replay", replay)]:
            model(ids, position_ids=pos, cache=cache, use_cache=True)
            a = model(ids[:, :1], position_ids=torch.tensor([[45], [45]]), cache=cache, use_cache=True)
            pad = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])  # row 1's token is padding
            b = model(ids[:, 1:2], attention_mask=pad, position_ids=torch.tensor([[46], [46]]),
                      cache=cache, use_cache=True)
            c = model(ids[:, 2:3], position_ids=torch.tensor([[47], [46]]), cache=cache, use_cache=True)
            results[name] = (a.logits, b.logits[:1], c.logits, cache.kv.seqlens.tolist())
    assert results[True][3] == results[False][3] == results["replay"][3] == [8, 7]
    for name in (True, "replay"):
        for x, y in zip(results[name][:3], results[False][:3]):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-4), name
    assert replay.decode_graph.captures == 1 and replay.decode_graph.replays == 3


def test_chunked_prefill_then_static_generate():
    """The route of `tpa bench generate`: a static cache prefilled in chunks (multi-token calls take the
    dynamic plan inside the fixed capacity), then generate() with it."""
    model = tiny("gqa")
    ids = torch.randint(1, VOCAB, (2, 21))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False)
    cache = with_eager_replay(model, 2, capacity=21 + 5)
    with torch.no_grad():
        for piece in ids[:, :-1].split(8, dim=1):
            model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=5,
                         min_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    assert cache.decode_graph.replays == 5  # the last prompt token and 4 generated ones


def test_beam_search_reorders_a_static_cache_in_place():
    model = tiny("mla")
    ids = torch.randint(1, VOCAB, (2, 5))
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(out, ref)


def test_graph_is_captured_again_when_the_model_changes():
    model = tiny("mha")
    ids = torch.randint(1, VOCAB, (1, 4))
    cache = with_eager_replay(model, 1, capacity=12)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)
        model(ids[:, 1:2], cache=cache, use_cache=True)
        assert cache.decode_graph.captures == 1
        model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(model.model.layers[0].mlp.down_proj.weight * 2)
        model(ids[:, 2:3], cache=cache, use_cache=True)
    assert cache.decode_graph.captures == 2 and cache.kv.num_columns == 7


def _scale_parameter(model):
    model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(model.model.layers[0].mlp.down_proj.weight * 2)


def _replace_block(model):
    from tpa.modules.mlp import SwiGLU

    cfg = model.config
    model.model.layers[1].mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)


def _reorder_block(model):
    # the same parameters in another order: layer 0's input norm moves behind its MLP
    first = model.model.layers[0]
    norm = first.input_layernorm
    del first._modules["input_layernorm"]
    first.input_layernorm = norm


def _nest_block(model):
    # layer 0's MLP becomes a child of its input norm: the ids of all entries read in the recorded
    # module order stay the same, only the entry counts tell (and the parameters' order changes)
    first = model.model.layers[0]
    mlp = first.mlp
    del first._modules["mlp"]
    first.input_layernorm.mlp = mlp


def _reinterpret_dtype(model):
    weight = model.model.norm.weight
    weight.data = weight.data.view(torch.complex64)  # the same storage read as another dtype


# name: (change, whether the graph key stays the same)
MUTATIONS = {
    "nothing": (lambda m: None, True),
    "in-place update": (lambda m: m.model.layers[0].mlp.down_proj.weight.data.mul_(2), True),
    "load_state_dict": (lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}), True),
    "parameter replaced": (_scale_parameter, False),
    "data reassigned": (lambda m: setattr(m.model.norm.weight, "data", m.model.norm.weight.data.clone()), False),
    "dtype": (lambda m: m.to(torch.float64), False),
    "module replaced": (_replace_block, False),
    "module order": (_reorder_block, False),
    "module nested": (_nest_block, False),
    "dtype reinterpreted": (_reinterpret_dtype, False),
    "parameter added": (lambda m: m.model.norm.register_parameter("extra", torch.nn.Parameter(torch.ones(1))), False),
    "parameter entry written directly": (lambda m: m.model.norm._parameters.__setitem__(
        "weight", torch.nn.Parameter(m.model.norm.weight.detach().clone())), False),
    "decode_impl": (lambda m: setattr(m.config, "decode_impl", "reference"), False),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_model_watch_says_unchanged_exactly_when_the_graph_key_is(mutation):
    """The per-step check that a captured graph still fits the model (a few C-level passes) agrees with
    the graph key (a walk of model.parameters()) on every kind of change."""
    from tpa.models.t6.decode_graph import _ModelWatch

    model = tiny("tpa")
    key, watch = DecodeGraph._key(model), _ModelWatch(model)
    assert watch.unchanged(model)
    change, stays = MUTATIONS[mutation]
    change(model)
    assert (DecodeGraph._key(model) == key) == stays
    assert watch.unchanged(model) == stays
    assert _ModelWatch(model).unchanged(model)
    assert not watch.unchanged(tiny("tpa"))  # another model


def test_replayed_steps_do_not_walk_the_parameters(monkeypatch):
    """Steps of an unchanged model check it through the watch: the parameter walk (the graph key) runs
    at the first step and again only after a change."""
    model = tiny("mha")
    ids = torch.randint(1, VOCAB, (1, 4))
    cache = with_eager_replay(model, 1, capacity=16)
    walks = []
    key = DecodeGraph._key
    monkeypatch.setattr(DecodeGraph, "_key", staticmethod(lambda m: walks.append(1) or key(m)))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        for t in range(4):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
        assert len(walks) == 1 and cache.decode_graph.captures == 1
        with torch.no_grad():
            model.model.norm.weight.data = model.model.norm.weight.data * 2
        model(ids[:, :1], cache=cache, use_cache=True)
        model(ids[:, 1:2], cache=cache, use_cache=True)
    assert len(walks) == 2 and cache.decode_graph.captures == 2 and cache.decode_graph.replays == 6


def test_generate_checks_the_model_once_per_call(monkeypatch):
    """Inside generate() (model_unchanged) the graph checks the model at its first step only; a new
    generate() call, or a step outside one, checks again and sees a change made in between."""
    from tpa.models.t6.decode_graph import model_unchanged

    model = tiny("tpa")
    ids = torch.randint(1, VOCAB, (1, 4))
    cache = with_eager_replay(model, 1, capacity=40)
    checks = []
    check = DecodeGraph._check_model
    monkeypatch.setattr(DecodeGraph, "_check_model", lambda self, m: checks.append(1) or check(self, m))
    kw = dict(max_new_tokens=6, do_sample=False, **cache_kwargs(cache))
    first = model.generate(ids, **kw)
    assert len(checks) == 1 and cache.decode_graph.replays == 5
    cache.reset()
    _scale_parameter(model)  # between two calls: the next call's first step sees it
    second = model.generate(ids, **kw)
    assert len(checks) == 2 and cache.decode_graph.captures == 2
    cache.reset()
    want = model.generate(ids, max_new_tokens=6, do_sample=False)  # a dynamic cache: no graph
    assert torch.equal(second, want) and not torch.equal(first, second)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        with model_unchanged(model):
            with model_unchanged(model):  # nested blocks: the inner one checks once
                model(ids[:, :1], cache=cache, use_cache=True)
                model(ids[:, 1:2], cache=cache, use_cache=True)
            model(ids[:, 2:3], cache=cache, use_cache=True)  # the outer block's first step
        model(ids[:, 3:4], cache=cache, use_cache=True)  # outside any block: every step
        model(ids[:, :1], cache=cache, use_cache=True)
    assert len(checks) == 2 + 4


# ------------------------------------------------------------------------------------- graph safety


class OpTrace(TorchDispatchMode):
    """Records every aten op with the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), tuple(tuple(o.shape) for o in flat if isinstance(o, torch.Tensor))))
        return out


SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave.Tensor", "item")


def traced_step(model, cache, token, mask=None):
    with torch.no_grad(), OpTrace() as trace:
        model(token, attention_mask=mask, cache=cache, use_cache=True)
    return trace.ops


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_static_step_has_no_host_sync_and_fixed_shapes(attention_type):
    """Every aten op of a static one-token step is free of host syncs and data-dependent shapes: the op
    sequence and every output shape are the same at different lengths, with or without padding."""
    model = tiny(attention_type, layers=1)
    ids, mask = left_padded((3, 6))
    traces = {}
    for static in (True, False):
        cache = T6Cache.for_model(model, 2, capacity=12, static=static)
        with torch.no_grad():
            model(ids, attention_mask=mask, cache=cache, use_cache=True)
        first = traced_step(model, cache, ids[:, :1], mask=torch.ones(2, 7, dtype=torch.long))
        second = traced_step(model, cache, ids[:, 1:2], mask=torch.tensor([[1] * 8, [1] * 7 + [0]]))
        traces[static] = (first, second)
    first, second = traces[True]
    assert not [op for op, _ in first + second if any(s in op for s in SYNCING)]
    assert first == second
    dyn_first, dyn_second = traces[False]  # the dynamic cache syncs and changes shapes: the check can fail
    assert any("_local_scalar_dense" in op for op, _ in dyn_first) and dyn_first != dyn_second


@pytest.mark.parametrize("attention_type", ["tpa", "mla", "gqa"])
def test_static_step_traces_as_one_graph(attention_type):
    """torch.compile(fullgraph=True) refuses graph breaks: .item(), .tolist(), data-dependent shapes
    or control flow in the static step would fail here (the eager backend only traces)."""
    model = tiny(attention_type, layers=1)
    cache = T6Cache.for_model(model, 2, capacity=12, static=True)
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        step = torch.compile(lambda x: model(x, cache=cache, use_cache=True).logits, backend="eager",
                             fullgraph=True)
        step(ids[:, :1])
    torch._dynamo.reset()
    assert cache.kv.seqlens.tolist() == [6, 6] and cache.kv.num_columns == 6


# ------------------------------------------------------------------------------ storage and errors


def test_static_cache_keeps_its_storage():
    model = tiny("tpa")
    cache = T6Cache.for_model(model, 2, capacity=16, static=True)
    kv = cache.kv

    def pointers():
        return [kv.seqlens.data_ptr(), kv.positions.data_ptr()] + \
            [b.data_ptr() for layer in kv.layers for b in layer.buffers.values()]

    before = pointers()
    assert all(b.shape[1] == 16 for layer in kv.layers for b in layer.buffers.values())
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)
        snapshot = kv.layers[0].buffers["a_k"].clone()
        cache.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(kv.layers[0].buffers["a_k"], snapshot.flip(0))
        cache.reset()
    assert pointers() == before
    assert kv.seqlens.tolist() == [0, 0] and cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="keeps its batch size"):
        cache.batch_repeat_interleave(2)


def test_generating_beyond_the_static_capacity_is_a_clear_error():
    model = tiny("mha")
    cache = T6Cache.for_model(model, 1, capacity=7, static=True)
    ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="static cache full: 7 input columns held \\+ 1 new exceed its capacity of 7"):
            model(ids[:, :1], cache=cache, use_cache=True)
    cache = with_eager_replay(model, 1, capacity=6)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="static cache full"):
            model(ids[:, :1], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="static cache full"):
            model(torch.randint(1, VOCAB, (1, 2)), cache=T6Cache.for_model(model, 1, 1, static=True),
                  use_cache=True)
    assert cache.decode_graph.replays == 1


def test_bad_static_configurations_raise():
    model = tiny("tpa")
    with pytest.raises(ValueError, match="needs a static cache"):
        T6Cache.for_model(model, 1, capacity=8, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        T6Cache.for_model(model, 1, capacity=8, static=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="dtype and device"):
        T6Cache([{"k": (1, 2)}], 1, capacity=8, static=True)
    with pytest.raises(ValueError, match="cache_implementation may be 'dynamic' or 'static'"):
        model.generate(torch.randint(1, VOCAB, (1, 3)), max_new_tokens=2, cache_implementation="offloaded")
    cache = T6Cache.for_model(model.to(torch.bfloat16), 1, capacity=8, static=True)
    with pytest.raises(TypeError, match="static cache takes the model's dtype"):
        model.float()(torch.randint(1, VOCAB, (1, 3)), cache=cache, use_cache=True)
    cache = T6Cache.for_model(model, 2, capacity=8, static=True)
    replay = EagerReplay(cache)
    with pytest.raises(ValueError, match=r"input_ids of shape \[2, 1\]"):
        replay.step(model, torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_cuda_graph_generate_equals_static_eager(attention_type):
    model = tiny(attention_type).cuda()
    ids, mask = left_padded()
    ids, mask = ids.cuda(), mask.cuda()
    eager = T6Cache.for_model(model, 3, capacity=16, static=True, cuda_graphs=False)
    ref = model.generate(ids, attention_mask=mask, **cache_kwargs(eager), **GREEDY)
    out = model.generate(ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    graph = output_cache(out).decode_graph
    assert graph is not None and graph.captures == 1 and graph.replays == 7
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        assert torch.equal(a, b)
