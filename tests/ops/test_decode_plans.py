"""The host side of tpa_decode (tpa.ops.decode_launch): plans per launch configuration, compiled
kernel handles, cached split workspaces, the triton_op, and validation on new keys.

Kernels run under Triton's interpreter on the CPU (compiled on a GPU). Results are checked with the
tolerance rule of tests/ops/test_decode.py (float64 truth, twice PyTorch's error at the dtype).
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from tests.ops.kernels import DEVICE, rerun_with_interpreter, skip_unless_kernels
from tests.ops.test_decode import POISON, assert_close_to_truth, make_inputs
from tpa.ops import decode, decode_launch, tpa_decode, triton_support
from tpa.ops.decode import DecodeConfig, DecodeHeuristic, DecodeLaunchOptions

needs_kernel = skip_unless_kernels("test_plans_in_fresh_process")


pytestmark = pytest.mark.usefixtures("fresh_decode_plans")


def _plans():
    return [entry.plan for entry in decode_launch.PLANS.values()]


def _call(inputs, **kw):
    return tpa_decode(*inputs[:7], block_table=inputs[7], return_lse=True, backend="triton", **kw)


@needs_kernel
def test_same_shapes_reuse_one_plan_other_shapes_get_their_own():
    """New tensors of the same shapes (and new lengths) reuse the plan; a different rank, head count,
    dtype, layout, stride or batch makes a new one; every result is right."""
    base = dict(lengths=[3, 40], n=1, h=34, d=64, e=64, ranks=(2, 1, 1), dtype=torch.float32, capacity=41)
    first = make_inputs(**base, seed=1)
    assert_close_to_truth(*_call(first), first)
    plan = _plans()[0]
    again = make_inputs(**{**base, "lengths": [17, 1]}, seed=2)  # other values and lengths, same shapes
    assert_close_to_truth(*_call(again), again)
    assert _plans() == [plan]
    variants = [
        dict(ranks=(3, 2, 1)), dict(ranks=(1, 1, 3)), dict(h=78), dict(dtype=torch.bfloat16),
        dict(lengths=[3, 40, 9]), dict(paged=True, page_size=16, capacity=48),
    ]
    for i, change in enumerate(variants):
        inputs = make_inputs(**{**base, **change}, seed=10 + i)
        assert_close_to_truth(*_call(inputs), inputs)
        assert len(_plans()) == i + 2, f"{change} should have made a new plan"
    strided = make_inputs(**base, seed=20, strided=True)  # same shapes, other strides
    assert_close_to_truth(*_call(strided), strided)
    assert len(_plans()) == len(variants) + 2
    assert all(p.split_handle is None for p in _plans()) or DEVICE == "cuda"  # the interpreter has no handles


@needs_kernel
def test_workspaces_follow_shapes_and_outputs_are_fresh():
    """Split partials are cached per plan (and stream) and reused by that plan's calls; alternating
    shapes never read another shape's workspace; each call returns its own output."""
    cfg = DecodeConfig(block_m=16, num_splits=3)
    small = dict(lengths=[5, 33], n=1, h=34, d=64, e=64, ranks=(1, 2, 3), dtype=torch.float32, capacity=45)
    large = dict(lengths=[44, 2, 61], n=2, h=5, d=80, e=64, ranks=(3, 1, 2), dtype=torch.float32, capacity=63)
    a1, b1, a2 = make_inputs(**small, seed=3), make_inputs(**large, seed=4), make_inputs(**small, seed=5)
    out_a1, lse_a1 = _call(a1, config=cfg)
    kept = out_a1.clone()
    out_b1, lse_b1 = _call(b1, config=cfg)
    out_a2, lse_a2 = _call(a2, config=cfg)
    for out, lse, inputs in ((out_a1, lse_a1, a1), (out_b1, lse_b1, b1), (out_a2, lse_a2, a2)):
        assert_close_to_truth(out, lse, inputs)
    assert torch.equal(out_a1, kept), "a later call overwrote an earlier call's output"
    assert out_a2.data_ptr() != out_a1.data_ptr()
    plan_a, plan_b = _plans()
    assert plan_a.num_splits == plan_b.num_splits == 3
    (ws_a,), (ws_b,) = plan_a._workspaces.values(), plan_b._workspaces.values()
    assert ws_a[0].shape == (2, 1, 34, 3, 64) and ws_b[0].shape == (3, 2, 5, 3, 64)
    ptr = ws_a[0].data_ptr()
    _call(a1, config=cfg)
    assert next(iter(plan_a._workspaces.values()))[0].data_ptr() == ptr  # reused, not reallocated


@needs_kernel
def test_poisoned_workspaces_are_never_cached():
    inputs = make_inputs([7, 30], 1, 34, 64, 64, (1, 1, 1), torch.float32, capacity=31, seed=6)
    cfg = DecodeConfig(block_m=16, num_splits=2)
    for _ in range(2):
        assert_close_to_truth(*_call(inputs, config=cfg, options=POISON), inputs)
    assert _plans()[0]._workspaces == {}


class _RecordingKernel:
    """Wraps a ``triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call, then launches."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls, self.fn = kernel, calls, kernel.fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


class _RecordingHandle:
    """Stands for a compiled kernel: ``run(*args)`` records what a launch through the handle passes."""

    function, packed_metadata = "fn", "meta"

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def run(self, *args):
        self.seen[self.name] = args


_CFG = DecodeConfig(block_m=16, num_splits=2)  # two splits: the split and the merge kernel both launch


def _two_split_inputs(seed, dtype=torch.float32, **kw):
    """Small inputs (B=2, H=34, ranks 3, 2, 1, capacity 32) on which :data:`_CFG` splits the cache in two."""
    return make_inputs([9, 23], 1, 34, 64, 64, (3, 2, 1), dtype, capacity=32, seed=seed, **kw)


def _recorded_plan(monkeypatch, inputs):
    """Run ``inputs`` once with the ``triton.jit`` kernels wrapped in :class:`_RecordingKernel`:
    returns the one plan it made and the list that records every later ``triton.jit`` launch too."""
    jit_calls = []
    kernels = tuple(_RecordingKernel(k, jit_calls) for k in decode_launch._kernels())
    monkeypatch.setattr(decode_launch, "_kernels", lambda: kernels)
    _call(inputs, config=_CFG)
    (plan,) = _plans()
    return plan, jit_calls


def _recording_handles(plan) -> dict:
    """Give ``plan`` recording handles (what a GPU plan has after its first launch): returns the dict
    in which each launch through them stores its arguments, under ``"split"`` and ``"merge"``."""
    seen = {}
    plan.split_handle, plan.merge_handle = _RecordingHandle("split", seen), _RecordingHandle("merge", seen)
    return seen


def _as_compiled(monkeypatch, plan, current_device, stream, capturing) -> dict:
    """Make ``plan`` look compiled on a GPU, on the CPU: the current device and stream are
    ``current_device()`` and ``stream``, graph capture is ``capturing()``; returns
    :func:`_recording_handles`'s dict."""
    monkeypatch.setattr(decode_launch, "_stream_getters", lambda: (current_device, lambda device: stream))
    monkeypatch.setattr(decode_launch, "_is_capturing", capturing)
    plan.compiled = True
    return _recording_handles(plan)


@needs_kernel
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_handle_launch_passes_the_arguments_of_the_jit_launch(paged, monkeypatch):
    """After a plan's first launch (through ``triton.jit``), later ones call the compiled handle with
    every argument of the kernel's signature in order: the tensors as their ``data_ptr()`` (the
    launcher takes integers as pointers), then the scalars and constexprs as ``triton.jit`` got them
    (constexprs included, as Triton >= 3.3 launchers take them)."""
    inputs = _two_split_inputs(7, torch.bfloat16, paged=paged, page_size=16)
    plan, jit_calls = _recorded_plan(monkeypatch, inputs)
    split_kernel, merge_kernel = decode_launch._kernels()
    (o_part, lse_part, *_), = plan._workspaces.values()
    seen = _recording_handles(plan)
    out, lse = _call(inputs, config=_CFG)
    assert len(jit_calls) == 2, "the second call went through triton.jit again"
    bt = inputs[7] if paged else inputs[6]
    # the split kernel's last pointer, TIMES, is lse_part where unused (no timeline)
    tensors = {"split": (*inputs[:7], bt, out, lse, o_part, lse_part, lse_part), "merge": (o_part, lse_part, out, lse)}
    for (grid, jit_args, jit_kwargs), name, kernel in zip(jit_calls, ("split", "merge"), (split_kernel, merge_kernel)):
        args = seen[name]
        assert args[:3] == (*grid, 1, 1)[:3] and args[4:9] == ("fn", "meta", None, None, None)
        params = list(inspect.signature(kernel.fn).parameters)
        assert len(args) - 9 == len(params), f"{name}: {len(args) - 9} arguments for {len(params)} parameters"
        n_ptr = len(tensors[name])
        assert list(args[9:9 + n_ptr]) == [t.data_ptr() for t in tensors[name]], f"{name}: pointers"
        assert all(isinstance(t, torch.Tensor) for t in jit_args[:n_ptr])  # triton.jit got the tensors
        assert args[9 + n_ptr:] == (*jit_args[n_ptr:], *(jit_kwargs[p] for p in params[len(jit_args):])), name


@needs_kernel
def test_graph_capture_takes_its_own_workspace_and_eager_calls_keep_the_fast_path(monkeypatch):
    """CUDA-graph capture simulated on the CPU (a plan marked compiled, recording handles, a patched
    current stream and capture flag): a call during capture launches through the handles with a
    fresh workspace that the plan does not keep; eager calls before and after it launch through the
    handles on the same, kept workspace, and never through triton.jit again."""
    inputs = _two_split_inputs(9)
    plan, jit_calls = _recorded_plan(monkeypatch, inputs)
    stream, capturing = 7, [False]
    seen = _as_compiled(monkeypatch, plan, lambda: plan.device_index, stream, lambda: capturing[0])

    def workspace_of_call():
        seen.clear()
        _call(inputs, config=_CFG)
        split, merge = seen["split"], seen["merge"]
        assert split[3] == merge[3] == stream
        assert split[9 + 10:9 + 12] == merge[9:11]  # the merge reads what the split wrote
        return split[9 + 10]

    eager = workspace_of_call()
    kept = dict(plan._workspaces)
    assert kept[stream][2] == eager
    capturing[0] = True
    captured = workspace_of_call()
    assert captured != eager and plan._workspaces == kept, "the capture used or replaced the eager workspace"
    capturing[0] = False
    assert workspace_of_call() == eager
    assert len(jit_calls) == 2, "a call after the handles existed went through triton.jit"


@needs_kernel
def test_handles_give_way_to_triton_jit_under_launch_hooks_or_another_device(monkeypatch):
    """A Triton launch hook (a profiler) or a current device other than the plan's sends a call with
    compiled handles through ``triton.jit`` (which calls the hooks and launches where it finds itself),
    with the right result; without them, the handles launch again."""
    inputs = _two_split_inputs(10)
    plan, jit_calls = _recorded_plan(monkeypatch, inputs)
    current = [plan.device_index]
    seen = _as_compiled(monkeypatch, plan, lambda: current[0], 0, lambda: False)

    def launches():
        seen.clear()
        jit_before = len(jit_calls)
        out, lse = _call(inputs, config=_CFG)
        if len(jit_calls) > jit_before:
            assert_close_to_truth(out, lse, inputs)
        return sorted(seen), len(jit_calls) - jit_before

    assert launches() == (["merge", "split"], 0)
    holder = triton_support._hook_holder()
    with monkeypatch.context() as hooked:
        hook = lambda *args: None  # noqa: E731
        if hasattr(holder.launch_enter_hook, "calls"):  # triton >= 3.5: a HookChain that profilers add to
            hooked.setattr(holder.launch_enter_hook, "calls", [hook])
        else:
            hooked.setattr(holder, "launch_enter_hook", hook)
        assert launches() == ([], 2)
    assert launches() == (["merge", "split"], 0)
    current[0] = 3
    assert launches() == ([], 2)


@needs_kernel
def test_a_repeat_through_handles_runs_no_other_python_of_the_decode_module(monkeypatch):
    """The host path of a repeat (a known key, a plan with compiled handles) is tpa_decode's own body
    and the plan's fast launch: no other function of tpa.ops.decode runs (no validation, no
    planning, no helper that would add a Python call to every eager decode step)."""
    inputs = _two_split_inputs(13)
    plan, jit_calls = _recorded_plan(monkeypatch, inputs)
    seen = _as_compiled(monkeypatch, plan, lambda: plan.device_index, 0, lambda: False)
    _call(inputs, config=_CFG)  # the entry switches to the plan's fast launch
    codes = []
    sys.setprofile(lambda frame, event, arg: codes.append(frame.f_code) if event == "call" else None)
    try:
        _call(inputs, config=_CFG, check_lengths=False)  # as on CUDA: the lengths stay on the device
    finally:
        sys.setprofile(None)
    assert [c.co_name for c in codes if c.co_filename == decode.__file__] == ["tpa_decode"]
    assert sorted(seen) == ["merge", "split"] and len(jit_calls) == 2


@needs_kernel
def test_triton_op_matches_the_eager_call():
    """``torch.ops.tpa.decode`` (what torch.compile traces) gives the eager call's numbers."""
    inputs = make_inputs([4, 29], 2, 34, 64, 64, (2, 2, 2), torch.float32, capacity=30, seed=8)
    out, lse = _call(inputs, config=DecodeConfig(block_m=16, num_splits=2))
    cfg = decode_launch.config_to_list(_plans()[0].cfg, DecodeLaunchOptions())
    op_out, op_lse = torch.ops.tpa.decode(*inputs[:7], None, 64 ** -0.5, True, cfg)
    torch.testing.assert_close(op_out, out, rtol=0, atol=0)
    torch.testing.assert_close(op_lse, lse, rtol=0, atol=0)
    op_out, op_lse = torch.ops.tpa.decode(*inputs[:7], None, 64 ** -0.5, False, cfg)
    torch.testing.assert_close(op_out, out, rtol=0, atol=0)
    assert op_lse.numel() == 0


@pytest.mark.parametrize("splits, return_lse", [(1, False), (1, True), (2, False)])
def test_triton_op_passes_every_pointer_its_own_tensor(splits, return_lse, monkeypatch):
    """The launches the triton_op traces give each pointer argument its own storage: the functional
    form of a wrap_triton launch copies mutated arguments one by one, so one tensor passed as both the
    output and an unused workspace was written through one copy and read through another (a compiled
    one-split step read zeros on the H200, 2026-12-02)."""
    import torch.library

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append([a for a in args if isinstance(a, torch.Tensor)])

    monkeypatch.setattr(torch.library, "wrap_triton", Recorder)
    inputs = make_inputs([4, 29], 1, 34, 64, 64, (2, 2, 2), torch.float32, capacity=32, seed=3)
    cfg = decode_launch.config_to_list(DecodeConfig(block_m=16, num_splits=splits), DecodeLaunchOptions())
    decode_launch._op_body(*inputs[:7], None, 64 ** -0.5, return_lse, cfg)
    assert len(launches) == (2 if splits > 1 else 1)
    inputs_ptrs = {t.untyped_storage().data_ptr() for t in inputs[:7]}
    for tensors in launches:
        written = [t for t in tensors if t.untyped_storage().data_ptr() not in inputs_ptrs]
        assert len({t.untyped_storage().data_ptr() for t in written}) == len(written), "a buffer passed twice"


class _Proxy:
    """Not a tensor, but forwards every attribute to one (what a repeat's key reads included)."""

    def __init__(self, tensor):
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)


def test_a_repeat_differing_in_what_validation_reads_is_validated_again(monkeypatch):
    """A known key skips validation, so every property validation checks is part of the key: a call
    that differs from a good one only in a dtype, a device, a stride or contiguity, or in being a
    tensor at all, is validated again and refused with validation's message, while the good repeat
    is not validated again."""
    validated = []
    make_entry = decode._make_entry
    monkeypatch.setattr(decode, "_make_entry", lambda *args: validated.append(1) or make_entry(*args))
    good = [t.cpu() if isinstance(t, torch.Tensor) else t for t in make_inputs(
        [5, 9], 1, 4, 32, 32, (2, 1, 2), torch.float32, capacity=12, seed=11)[:7]]
    out = torch.empty(2, 1, 4, 32)
    for _ in range(2):
        tpa_decode(*good, backend="reference")
        tpa_decode(*good, backend="reference", out=out)
    assert len(validated) == 2, "a repeat of a good call was validated again"

    def swap(i, value):
        return [value if j == i else t for j, t in enumerate(good)]

    bad_calls = [
        (swap(3, good[3].half()), {}, TypeError, "dtype"),
        (swap(4, good[4].to("meta")), {}, ValueError, "share a device"),
        (swap(6, good[6].long()), {}, TypeError, "int32"),
        (swap(6, torch.stack([good[6], good[6]], 1)[:, 0]), {}, ValueError, "cache_seqlens must be contiguous"),
        (swap(0, _Proxy(good[0])), {}, TypeError, "a_q must be a torch.Tensor"),
        (swap(5, _Proxy(good[5])), {}, TypeError, "b_v_cache must be a torch.Tensor"),
        (good, {"out": torch.empty(2, 1, 32, 4).transpose(2, 3)}, ValueError, "out must be contiguous"),
        (good, {"out": out.half()}, ValueError, "out must be"),
        (good, {"out": _Proxy(out)}, TypeError, "out must be a torch.Tensor"),
    ]
    for args, kwargs, exc, match in bad_calls:
        before = len(validated)
        with pytest.raises(exc, match=match):
            tpa_decode(*args, backend="reference", **kwargs)
        assert len(validated) == before + 1
    with pytest.raises(ValueError, match="exceeds the cache capacity"):  # values: checked per call on CPU
        tpa_decode(*good[:6], torch.tensor([5, 13], dtype=torch.int32), backend="reference")


@needs_kernel
def test_same_shapes_other_strides_get_their_own_plan():
    """Caches of one shape laid out three ways (contiguous, and slices of two wider buffers) make three
    plans, each right; a contiguous cache whose size-1 dimension has another stride (never indexed
    but at 0) shares the contiguous plan and is right too."""
    base = {"lengths": [6, 21], "n": 1, "h": 34, "d": 64, "e": 64, "ranks": (2, 1, 1), "dtype": torch.float32,
            "capacity": 24}
    contiguous = make_inputs(**base, seed=30)
    assert_close_to_truth(*_call(contiguous), contiguous)
    for seed, extra in ((31, 7), (32, 3)):
        inputs = list(make_inputs(**base, seed=seed))
        wide = [torch.cat([c, torch.randn(c.shape[0], extra, *c.shape[2:], dtype=c.dtype, device=c.device)], 1)
                for c in inputs[2:6]]
        inputs[2:6] = [w[:, :base["capacity"]] for w in wide]
        assert_close_to_truth(*_call(inputs), inputs)
    assert len(_plans()) == 3
    odd = list(make_inputs(**base, seed=33))
    odd[2:6] = [c.as_strided(c.shape, (*c.stride()[:2], 12345, c.stride(3))) for c in odd[2:6]]  # R = 1
    assert all(c.is_contiguous() for c in odd[2:6])
    assert_close_to_truth(*_call(odd), odd)
    assert len(_plans()) == 3


def test_plan_table_is_bounded(monkeypatch):
    monkeypatch.setattr(decode_launch, "MAX_PLANS", 2)
    for length in (5, 6, 7):
        inputs = [t.cpu() if isinstance(t, torch.Tensor) else t for t in make_inputs(
            [length], 1, 4, 32, 32, (1, 1, 1), torch.float32, seed=length)[:7]]
        tpa_decode(*inputs, backend="reference")
    assert len(decode_launch.PLANS) == 2


def test_int64_offsets_follow_the_largest_offset_within_a_sequence():
    """OFFS_64 whenever an element of one sequence lies 2^31 elements or more past its start: a long
    token-major cache, and also a rank-major view whose rank stride (M * X) is the large one."""
    def cache(size, stride):
        return torch.empty_strided(size, stride, device="meta")

    m = 2**20
    token_major = cache((2, m, 2, 98), (m * 196, 196, 98, 1))  # 2^20 * 196 elements per sequence
    assert not decode_launch.needs_int64_offsets([token_major], m)
    long_token_major = cache((1, 16 * m, 2, 98), (16 * m * 196, 196, 98, 1))
    assert decode_launch.needs_int64_offsets([long_token_major], 16 * m)
    rank_major = cache((1, 12 * m, 2, 98), (2 * 12 * m * 98, 98, 12 * m * 98, 1))  # [B, R, M, X] storage
    assert rank_major.stride(1) * 12 * m < 2**31  # the token offsets alone fit in int32
    assert decode_launch.needs_int64_offsets([rank_major], 12 * m)


@needs_kernel
def test_int64_offsets_path_matches_truth(monkeypatch):
    """The kernel's int64 offset path (token and rank offsets widened), forced on small inputs, on a
    rank-major view of the caches."""
    monkeypatch.setattr(decode_launch, "needs_int64_offsets", lambda caches, capacity: True)
    inputs = make_inputs(lengths=[5, 33], n=2, h=34, d=64, e=64, ranks=(2, 3, 2), dtype=torch.float32,
                         capacity=40, seed=31)
    rank_major = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in inputs[2:6]]
    inputs = (*inputs[:2], *rank_major, *inputs[6:])
    assert rank_major[0].stride(2) == 40 * 34
    out, lse = _call(inputs)
    assert _plans()[0].split_constexprs["OFFS_64"]
    assert_close_to_truth(out, lse, inputs)


def test_plans_in_fresh_process():
    rerun_with_interpreter(__file__, "plan or workspace or handle or triton_op")


@pytest.mark.gpu
def test_gpu_handles_graph_capture_and_compile():
    """On a GPU: the second call launches through the compiled handles with the same numbers; a CUDA
    graph capture allocates its own workspace (never the eager one); torch.compile of a function
    calling tpa_decode (inductor launches the triton_op's kernels) gives the eager numbers."""
    inputs = make_inputs([300, 4000], 1, 32, 64, 64, (6, 2, 2), torch.bfloat16, capacity=4096, seed=12)
    first = tpa_decode(*inputs[:7])
    (plan,) = _plans()
    assert plan.num_splits > 1 and plan.split_handle is not None and plan.merge_handle is not None
    torch.testing.assert_close(tpa_decode(*inputs[:7]), first, rtol=0, atol=0)
    eager_ws = {k: v[0].data_ptr() for k, v in plan._workspaces.items()}
    static_out = torch.empty_like(first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tpa_decode(*inputs[:7], out=static_out)
    assert {k: v[0].data_ptr() for k, v in plan._workspaces.items()} == eager_ws
    graph.replay()
    torch.testing.assert_close(static_out, first, rtol=0, atol=0)
    compiled = torch.compile(lambda *x: tpa_decode(*x), fullgraph=True)
    torch.testing.assert_close(compiled(*inputs[:7]), first, rtol=0, atol=0)
    # one split (a short cache): the kernel writes the output itself, its workspace arguments unused
    short = make_inputs([3, 40], 1, 34, 64, 64, (2, 2, 2), torch.bfloat16, capacity=48, seed=13)
    want = tpa_decode(*short[:7])
    assert _plans()[-1].num_splits == 1
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(*short[:7]), want, rtol=0, atol=0)


def _row_starts(t: torch.Tensor) -> torch.Tensor:
    """Element offsets of every head-factor row ``t[i, j, r, :]`` from ``t``'s first element."""
    idx = [torch.arange(n) * s for n, s in zip(t.shape[:3], t.stride()[:3])]
    return (idx[0][:, None, None] + idx[1][None, :, None] + idx[2][None, None, :]).flatten()


@pytest.mark.parametrize(("shape", "stride", "expected"), [
    ((2, 10, 2, 34), None, 2),  # small's TPA: rows of 34 heads
    ((2, 10, 2, 35), None, 1),
    ((2, 10, 2, 40), None, 8),
    ((2, 10, 1, 32), None, 16),
    ((2, 10, 2, 34), (10 * 96, 96, 48, 1), 16),  # buf[..., :34] of a buffer of 48 heads
    ((2, 10, 2, 34), (10 * 96 + 3, 96, 48, 1), 1),  # an odd sequence stride
    ((1, 10, 2, 34), (10 * 96 + 3, 96, 48, 1), 16),  # ... of a dimension of size 1, never stepped
    ((3, 10, 2, 34), (2 * 10 * 34, 34, 10 * 34, 1), 2),  # a rank-major view
    ((3, 10, 4, 64), (640, 64, 0, 1), 16),  # ranks expanded with stride 0
    ((3, 10, 2, 34), (680, 68, 1, 34), 1),  # head stride not 1
])
def test_a_row_alignment_divides_every_row_start(shape, stride, expected):
    """The split kernel's A_ALIGN hint: the largest power of two (to 16) that divides the offset of
    every row start of both A caches, checked against the offsets themselves."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride or torch.empty(shape).stride()))
    t = torch.empty(shape) if stride is None else torch.empty(size).as_strided(shape, stride)
    align = decode_launch.a_row_alignment(t)
    assert align == expected
    if t.stride(3) == 1:
        assert bool((_row_starts(t) % align == 0).all())
        assert align == 16 or not bool((_row_starts(t) % (2 * align) == 0).all())
    assert decode_launch.a_row_alignment(t, torch.empty(2, 10, 2, 34)) == min(align, 2)


@needs_kernel
def test_plans_pass_the_a_row_alignment_to_the_kernel():
    inputs = make_inputs(lengths=[5, 9], n=1, h=34, d=32, e=32, ranks=(2, 2, 2), dtype=torch.float32, seed=3)
    out, lse = _call(inputs)
    assert _plans()[0].split_constexprs["A_ALIGN"] == 2
    assert_close_to_truth(out, lse, inputs)


def test_a_register_cap_reaches_the_launch_and_the_op_config():
    """DecodeConfig.max_registers becomes the split kernel's ``maxnreg`` option, and survives the
    triton_op's config list; none by default."""
    inputs = make_inputs(lengths=[5], n=1, h=4, d=32, e=32, ranks=(1, 1, 1), dtype=torch.float32, seed=5)
    cfg = decode.default_config(1, 1, 4, 32, 32, 5, 4, 4, DecodeConfig(max_registers=168))
    plan = decode_launch.DecodePlan(*inputs[:6], None, 1.0, False, cfg, DecodeLaunchOptions())
    assert plan.split_options["maxnreg"] == 168
    default = decode_launch.DecodePlan(*inputs[:6], None, 1.0, False, decode.default_config(1, 1, 4, 32, 32, 5, 4),
                                       DecodeLaunchOptions())
    assert "maxnreg" not in default.split_options
    for capped in (DecodeConfig(max_registers=168), DecodeConfig()):
        as_list = decode_launch.config_to_list(capped, DecodeLaunchOptions())
        assert decode_launch._config_from_list(tuple(as_list), False)[0] == capped
    with pytest.raises(ValueError, match="max_registers"):
        DecodeConfig(max_registers=0)


def test_the_split_rule_reaches_the_op_config():
    """The heuristic's split rule and wave-fill margin survive the op's config list (the traced op
    plans its launch from that list)."""
    for heuristic in (DecodeHeuristic(), DecodeHeuristic(splits="programs", programs_per_sm=3, wave_fill_margin=0.05, max_splits=600,
                                                     long_split_blocks=9)):
        as_list = decode_launch.config_to_list(DecodeConfig(), DecodeLaunchOptions(heuristic=heuristic))
        assert decode_launch._config_from_list(tuple(as_list), False)[1].heuristic == heuristic


@pytest.mark.parametrize("a_dot", [False, True])
def test_the_head_factor_path_reaches_the_op_config_and_the_kernel(a_dot):
    """DecodeLaunchOptions.a_dot survives the op's config list, and becomes the split kernel's A_DOT
    for 16-bit caches only (float32 caches keep plain loads)."""
    options = DecodeLaunchOptions(a_dot=a_dot)
    as_list = decode_launch.config_to_list(DecodeConfig(), options)
    assert decode_launch._config_from_list(tuple(as_list), False)[1].a_dot is a_dot
    for dtype, expected in ((torch.bfloat16, a_dot), (torch.float16, a_dot), (torch.float32, False)):
        inputs = make_inputs(lengths=[5], n=1, h=4, d=32, e=32, ranks=(1, 1, 1), dtype=dtype, seed=5)
        cfg = decode.default_config(1, 1, 4, 32, 32, 5, 4, inputs[0].element_size())
        plan = decode_launch.DecodePlan(*inputs[:6], None, 1.0, False, cfg, options)
        assert plan.split_constexprs["A_DOT"] is expected


def _count_keyed(monkeypatch):
    keyed = []
    keyed_entry = decode._keyed_entry
    monkeypatch.setattr(decode, "_keyed_entry", lambda *args: keyed.append(1) or keyed_entry(*args))
    return keyed


@needs_kernel
def test_a_repeat_of_the_last_call_skips_the_key_and_any_change_is_keyed(monkeypatch):
    """A repeat of the last call (same classes, shapes, strides, dtypes, devices and arguments,
    aligned pointers) is found through the recent entry's guard, without building the key; a call
    differing in any of those goes through the key, and alternating shapes reuse their plans."""
    keyed = _count_keyed(monkeypatch)
    base = dict(lengths=[3, 40], n=1, h=34, d=64, e=64, ranks=(2, 1, 1), dtype=torch.float32, capacity=41)
    first = make_inputs(**base, seed=1)
    for seed in (1, 2, 3):  # new tensors and values, the same layout
        inputs = make_inputs(**base, seed=seed)
        assert_close_to_truth(*_call(inputs), inputs)
    assert len(keyed) == 1 and len(_plans()) == 1
    other = make_inputs(**{**base, "h": 5}, seed=4)
    for inputs in (other, first, other, first):
        assert_close_to_truth(*_call(inputs), inputs)
    assert len(keyed) == 5 and len(_plans()) == 2, "alternating layouts should reuse their two plans"
    changes = [
        lambda x: [x[0].clone().requires_grad_(), *x[1:]],  # autograd state (a guard checks it)
        lambda x: [torch.nn.Parameter(x[0].clone(), requires_grad=False), *x[1:]],  # another class
        lambda x: [*x[:2], *make_inputs(**base, seed=5, strided=True)[2:6], *x[6:]],  # other strides
    ]
    for change in changes:
        before = len(keyed)
        inputs = change(list(first))
        assert_close_to_truth(*_call(inputs), inputs)
        assert len(keyed) == before + 1
    before = len(keyed)
    out = _call(first, softmax_scale=0.3)  # another argument
    assert len(keyed) == before + 1
    assert_close_to_truth(*out, first, softmax_scale=0.3)
    paged = make_inputs(**{**base, "paged": True, "capacity": 48}, seed=6)
    out = torch.full((2, 1, 34, 64), float("nan"), device=paged[0].device)
    for _ in range(2):  # a block table and an output buffer are guarded too
        assert_close_to_truth(*_call(paged, out=out), paged)
    assert len(keyed) == before + 2
    _call(paged, out=out.clone())
    assert len(keyed) == before + 2, "another output buffer of the same layout is a repeat"
    _call(paged)
    assert len(keyed) == before + 3


@needs_kernel
def test_tensors_changed_in_place_are_keyed_again(monkeypatch):
    """The guard reads each call's tensors, so a tensor object whose shape or strides change in place
    between two calls (set_, resize_) is keyed and planned again, and the result is right."""
    keyed = _count_keyed(monkeypatch)
    base = dict(lengths=[6, 21], n=1, h=34, d=64, e=64, ranks=(2, 1, 1), dtype=torch.float32, capacity=24)
    inputs = list(make_inputs(**base, seed=40))
    assert_close_to_truth(*_call(inputs), inputs)
    a_k = inputs[2]
    wide = torch.randn(2, 31, 2, 34, dtype=a_k.dtype, device=a_k.device)  # [B, M + 7, R_k, H]
    wide[:, :24, :1] = a_k
    a_k.set_(wide.untyped_storage(), 0, a_k.shape, wide[:, :24, :1].stride())  # same values, other strides
    assert_close_to_truth(*_call(inputs), inputs)
    assert len(keyed) == 2 and len(_plans()) == 2
    a_q = inputs[0]
    a_q.resize_(2, 1, 2, 17)  # the same storage read as 17 heads: a_k's 34 no longer match
    with pytest.raises(ValueError, match="head count H=17"):
        _call(inputs)
    assert len(keyed) == 3


@needs_kernel
def test_without_tensor_guards_every_call_is_keyed(monkeypatch):
    """A torch without dynamo's C guards (or another signature of them) keys every call, with the
    same results."""
    monkeypatch.setattr(decode, "_TensorGuards", None)
    keyed = _count_keyed(monkeypatch)
    inputs = make_inputs([5, 9], 1, 4, 32, 32, (2, 1, 2), torch.float32, capacity=12, seed=11)
    for _ in range(3):
        assert_close_to_truth(*_call(inputs), inputs)
    assert len(keyed) == 3 and len(_plans()) == 1 and decode_launch.RECENT[0] is None


def test_a_guard_that_cannot_be_rebuilt_clears_the_recent_entry(monkeypatch):
    """When the recent entry's guard fails and a new one cannot be built (TensorGuards refusing these
    tensors), the entry stops being the recent one, and every later call is keyed."""
    keyed = _count_keyed(monkeypatch)
    good = [t.cpu() if isinstance(t, torch.Tensor) else t for t in make_inputs(
        [5, 9], 1, 4, 32, 32, (2, 1, 2), torch.float32, capacity=12, seed=11)[:7]]
    want = tpa_decode(*good, backend="reference")
    assert decode_launch.RECENT[0] is not None
    monkeypatch.setattr(decode, "_tensor_guard", lambda tensors: None)
    again = [t.clone() for t in good]
    again[0].requires_grad_()  # the guard fails, and none can be built
    for _ in range(2):
        torch.testing.assert_close(tpa_decode(*again, backend="reference"), want, rtol=0, atol=0)
    assert decode_launch.RECENT[0] is None and len(keyed) == 3


def test_misaligned_calls_and_inference_mode_are_keyed(monkeypatch):
    """A call with a pointer off 16 bytes is keyed every time (its alignment is part of the key) and
    never becomes the recent entry; a guard built outside inference mode fails inside it (dispatch
    keys), and the keyed call rebuilds it there."""
    keyed = _count_keyed(monkeypatch)
    good = [t.cpu() if isinstance(t, torch.Tensor) else t for t in make_inputs(
        [5, 9], 1, 4, 32, 32, (2, 1, 2), torch.float32, capacity=12, seed=11)[:7]]
    shifted = list(good)
    shifted[1] = torch.empty(good[1].numel() + 1)[1:].view_as(good[1]).copy_(good[1])  # 4 bytes off
    want = tpa_decode(*good, backend="reference")
    for _ in range(2):
        torch.testing.assert_close(tpa_decode(*shifted, backend="reference"), want)  # (vectorised otherwise)
    assert len(keyed) == 3 and decode_launch.RECENT[0] is not None
    recent = decode_launch.RECENT[0]
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(tpa_decode(*good, backend="reference"), want, rtol=0, atol=0)
    assert len(keyed) == 4 and decode_launch.RECENT[0] is recent
    decode_launch.clear_plans()
    assert decode_launch.RECENT[0] is None


def test_direct_launch_passes_what_tritons_launcher_would(monkeypatch):
    """Where Triton's C launcher is called directly (Triton 3.5 and 3.6, no scratch memory), it gets
    exactly the arguments the installed Triton's own ``CudaLauncher.__call__`` passes it for the same
    launch; with scratch memory, another Triton or another launcher class the handle's ``run`` stays."""
    driver = pytest.importorskip("triton.backends.nvidia.driver")

    def launcher(scratch=0):
        run = object.__new__(driver.CudaLauncher)  # no compiled launcher module: its C launch is recorded
        calls = []
        run.__dict__.update(num_ctas=1, global_scratch_size=scratch, global_scratch_align=1, profile_scratch_size=0,
                            profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=True, gsan_enabled=False,
                            arg_annotations="annotations", kernel_signature="signature",
                            launch=lambda *args: calls.append(args))
        return run, calls

    class Handle:
        function, packed_metadata = "fn", "meta"

        def __init__(self, run):
            self.run = run

    run, calls = launcher()
    handle = Handle(run)
    launch, fixed = decode_launch.launcher_of(handle)
    if decode_launch._direct_launch_supported():  # (later Triton's __call__ asks for a GPU driver first)
        grid_stream, kernel_args = (3, 2, 1, 7), (11, 12, 0.5, 64)
        run(*grid_stream, handle.function, handle.packed_metadata, None, None, None, *kernel_args)
        assert launch == run.launch
        launch(*grid_stream, *fixed, *kernel_args)
        assert calls[1] == calls[0]
    else:
        assert launch is run and fixed == (handle.function, handle.packed_metadata, None, None, None)
    monkeypatch.setattr(decode_launch, "_direct_launch_supported", lambda: True)
    scratch_run, _ = launcher(scratch=256)
    assert decode_launch.launcher_of(Handle(scratch_run))[0] is scratch_run
    plain = Handle(lambda *args: None)
    assert decode_launch.launcher_of(plain)[0] is plain.run
