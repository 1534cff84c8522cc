"""One-token decode steps of a T6 model replayed from a captured CUDA graph.

Eager cached decoding of a small model is bound by host time: about 40 kernel launches per layer,
milliseconds of Python and dispatcher work per step against about a millisecond of GPU work. A CUDA
graph records the launches of one step once and replays them with a single call.

A step can be captured because a static :class:`tpa.cache.KVCache` plans it on the device: fixed
buffers of a fixed capacity, lengths in one device tensor updated in place, the write slot, the
RoPE position and the ``[B, 1, capacity]`` mask computed from the lengths, no host sync and no
shape that depends on data. SDPA layers (MHA, GQA, MQA, MLA) attend over the whole capacity under
that mask; TPA and TPA-KVonly call the FlashTPA kernel ``tpa_decode`` with device ``cache_seqlens``.

Design choice: an explicit ``torch.cuda.CUDAGraph`` capture of the eager static step, not
transformers' auto-compile (``torch.compile(mode="reduce-overhead")`` when ``Cache.is_compileable``):

- Exactness: a replay launches exactly the kernels of the eager static step on the same inputs, so
  it gives the eager step's numbers; Inductor would fuse and reorder the arithmetic and
  ``torch.compile`` output differs from eager by rounding.
- Cost: a capture costs a few eager steps (milliseconds); compiling a 12-layer model costs tens of
  seconds per new shape (batch size, capacity) and again whenever a guard fails.
- Robustness: the cache's host bookkeeping (``num_columns``, the capacity check) stays plain
  Python outside the graph, where dynamo would guard on it; the FlashTPA kernel's host wrapper
  (lazy Triton compilation, launch heuristics) runs once during warm-up instead of being traced.
- Scope: only the one-token step is captured; prefill stays eager (once per ``generate``).

What a replay assumes, and how it is kept true:

- The cache's tensors keep their storage: a static cache never reallocates (reordering for beam
  search, ``reset`` and ``commit`` work in place).
- The model's parameters keep their storage, dtype and ``decode_impl``: the graph is keyed by them
  and captured again when they change (e.g. after ``model.to(...)``). A step checks this through a
  ``_ModelWatch`` (a few C-level passes over the recorded modules and parameters) and walks
  ``model.parameters()`` for the key only when the watch reports a change. Inside
  :func:`model_unchanged` (``T6ForCausalLM.generate`` enters it: only transformers' loop runs between
  its steps) the check runs at the first step of the block only; it costs about 120 microseconds of
  host time per step on an H200 machine, while the GPU waits.
- Python side effects of the step happen on the host around the replay: the capacity check before,
  ``num_columns += 1`` after.
- Warm-up runs (Triton compilation, cuBLAS workspaces) happen before the capture on a side stream;
  their effect on the cache is undone (lengths restored; the slot they wrote lies beyond the
  restored length and is rewritten by the replay).
"""

from __future__ import annotations

import operator
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from itertools import chain

import torch

__all__ = ["DecodeGraph", "model_unchanged"]

# model -> the token of the innermost model_unchanged() block it is in
_UNCHANGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def model_unchanged(model):
    """A block in which ``model``'s parameters, dtype and ``decode_impl`` stay as they are, so that
    :meth:`DecodeGraph.step` checks them at its first step in the block only (``generate()``: nothing but
    its own loop runs between two steps; a logits processor or streamer that moved the model's
    weights would break this promise)."""
    before = _UNCHANGED.get(model)
    _UNCHANGED[model] = object()
    try:
        yield
    finally:
        if before is None:
            _UNCHANGED.pop(model, None)
        else:
            _UNCHANGED[model] = before

_deref = weakref.ref.__call__
_dicts_of = operator.attrgetter("_modules", "_parameters")
_dtype_of = operator.attrgetter("dtype")


class _ModelWatch:
    """Tells in a few C-level passes whether :meth:`DecodeGraph._key` of a model is still the one it
    had when the watch was made, without walking ``model.parameters()`` (which costs ~2,000 Python
    calls for the ``small`` preset, every decode step).

    It records the modules in ``model.modules()`` order, the number of entries and the object ids of
    the values in each one's ``_modules`` and ``_parameters``, and the data pointer and dtype of each
    of ``model.parameters()``. When every recorded module and parameter is still alive (they are held
    by weak references: a live object's id is not reused) and all of that reads the same, the module
    tree walked from the model holds the same parameters in the same order, with the same storage
    and dtype: the key is unchanged. Any other outcome means "look again" (:meth:`unchanged` False).
    """

    def __init__(self, model):
        modules = list(model.modules())
        params = list(model.parameters())
        self.model = weakref.ref(model)
        self.decode_impl = getattr(model.config, "decode_impl", None)
        self.modules = list(map(weakref.ref, modules))
        self.params = list(map(weakref.ref, params))
        self.tree = self._tree(modules)
        self.pointers = list(map(torch.Tensor.data_ptr, params))
        self.dtypes = list(map(_dtype_of, params))

    @staticmethod
    def _tree(modules) -> tuple[list[int], list[int]]:
        dicts = list(chain.from_iterable(map(_dicts_of, modules)))
        return list(map(len, dicts)), list(map(id, chain.from_iterable(map(dict.values, dicts))))

    def unchanged(self, model) -> bool:
        if self.model() is not model or getattr(model.config, "decode_impl", None) != self.decode_impl:
            return False
        params = list(map(_deref, self.params))
        try:  # a module or parameter gone (None) fails its attribute read: AttributeError, TypeError
            return (self._tree(map(_deref, self.modules)) == self.tree
                    and list(map(torch.Tensor.data_ptr, params)) == self.pointers
                    and list(map(_dtype_of, params)) == self.dtypes)
        except (AttributeError, TypeError):
            return False


class DecodeGraph:
    """Captured one-token steps of a T6 model over one static cache.

    Static inputs (device tensors the graph reads): ``input_ids [B, 1]`` long, ``valid [B, 1]`` bool
    (the last column of the attention mask), ``position_ids [B, 1]`` long (explicit positions only).
    One graph per position mode (default positions = cache slots, or explicit ``position_ids``),
    each with its static output ``logits [B, 1, V]``; graphs are captured at their first step.

    Args:
        cache: the :class:`tpa.models.t6.cache_t6.T6Cache` (static, on CUDA) whose buffers the
            graphs read and write. Held by a weak reference (the cache owns this object).

    What it owns: the static inputs above, the captured graphs with their output tensors, and the
    key they were captured for (the model's parameters and decode path). What it does not own: the
    cache's buffers and lengths (the cache's, updated in place by the replayed kernels) and the
    model (passed to every :meth:`step`). The cache holds it as ``T6Cache.decode_graph``, so that
    ``generate(cache_implementation="static")`` gets graph replays with no other argument;
    ``T6ForCausalLM.forward`` routes a call to :meth:`step` when :meth:`handles` says so.

    ``_record`` is the only CUDA-specific part (warm-up, capture, replay); the tests replace it
    with an eager stand-in to exercise the rest on the CPU.

    Attributes:
        captures: graphs captured so far; replays: steps replayed; capture_seconds: host time spent
            in warm-up and capture (device synchronised), summed over captures.
    """

    warmup_steps = 2

    def __init__(self, cache):
        kv = cache.kv
        if not kv.static:
            raise ValueError("DecodeGraph needs a static cache (T6Cache(..., static=True))")
        self._cache = weakref.ref(cache)
        self.device = kv.seqlens.device
        bsz = kv.batch_size
        self.input_ids = torch.zeros(bsz, 1, dtype=torch.long, device=self.device)
        self.valid = torch.ones(bsz, 1, dtype=torch.bool, device=self.device)
        self.position_ids = torch.zeros(bsz, 1, dtype=torch.long, device=self.device)
        self._graphs: dict[bool, tuple[Callable[[], None], torch.Tensor]] = {}
        self._model_key: tuple | None = None
        self._watch: _ModelWatch | None = None  # tells cheaply that _key(model) is still _model_key
        self._checked_in: object | None = None  # the model_unchanged() block of the last check
        self.captures = 0
        self.replays = 0
        self.capture_seconds = 0.0

    def handles(self, input_ids, inputs_embeds, labels, logits_to_keep) -> bool:
        """Whether a ``T6ForCausalLM.forward`` call is a step this graph replays: one token per
        sequence given as ids, no labels, no gradient, the last position's logits (or all of one), and
        not itself inside a capture. Every other call runs eagerly on the same static cache."""
        return (input_ids is not None and inputs_embeds is None and input_ids.dim() == 2 and input_ids.shape[1] == 1
                and labels is None and not torch.is_grad_enabled()
                and isinstance(logits_to_keep, int) and logits_to_keep in (0, 1)
                and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()))

    @staticmethod
    def _key(model) -> tuple:
        """What a captured graph depends on besides the cache: the model's parameters (their
        storage and dtype) and its decode path."""
        params = tuple((p.data_ptr(), p.dtype) for p in model.parameters())
        return id(model), getattr(model.config, "decode_impl", None), params

    def _forward(self, model, explicit_positions: bool) -> torch.Tensor:
        """The eager static step on the static inputs: ``logits [B, 1, V]``."""
        out = model.model(input_ids=self.input_ids, attention_mask=self.valid,
                          position_ids=self.position_ids if explicit_positions else None,
                          cache=self._cache(), use_cache=True)
        return model.lm_head(out.last_hidden_state)

    def _capture(self, model, explicit_positions: bool) -> tuple[Callable[[], None], torch.Tensor]:
        kv = self._cache().kv
        start = time.perf_counter()
        saved_lengths, saved_columns = kv.seqlens.clone(), kv.num_columns

        def run() -> torch.Tensor:
            return self._forward(model, explicit_positions)

        def undo() -> None:  # the step's slot lies beyond the restored length; the replay rewrites it
            kv.seqlens.copy_(saved_lengths)
            kv.num_columns = saved_columns

        try:
            recorded = self._record(run, undo)
        finally:
            kv.num_columns = saved_columns  # a capture runs the step's Python, not its kernels
        self.capture_seconds += time.perf_counter() - start
        self.captures += 1
        return recorded

    def _record(self, run: Callable[[], torch.Tensor], undo: Callable[[], None]
                ) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm up (``run`` then ``undo``, on a side stream), capture ``run`` in a CUDA graph.

        Returns the replay function and the graph's output tensor (rewritten by every replay). A
        capture records kernels without running them, so the cache is as before afterwards.
        """
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device; the cache is on {self.device}")
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    run()
                    undo()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            torch.cuda.synchronize()

        def replay() -> None:
            with torch.cuda.device(self.device):
                graph.replay()

        return replay, out

    def _check_model(self, model) -> None:
        """Forget the captured graphs when ``model``'s key (:meth:`_key`) changed since they were captured."""
        if self._watch is None or not self._watch.unchanged(model):
            key = self._key(model)
            if key != self._model_key:
                self._graphs.clear()
                self._model_key = key
            self._watch = _ModelWatch(model)

    def step(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of ``model`` (a ``T6ForCausalLM``) by graph replay.

        Args:
            input_ids: ``[B, 1]`` token ids (not range-checked: an id outside the vocabulary fails
                on the device, as any step without a host sync would).
            attention_mask: optional ``[B, past + 1]``; only its last column is read (0 = padding).
            position_ids: optional ``[B, 1]`` or ``[1, 1]`` explicit RoPE positions.

        Returns:
            ``logits [B, 1, V]``, a fresh tensor (the graph's output buffer is copied).

        Raises:
            ValueError: mis-shaped inputs, inputs on another device, or a full cache.
        """
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the cache this DecodeGraph was built for no longer exists")
        kv = cache.kv
        bsz = kv.batch_size
        if tuple(input_ids.shape) != (bsz, 1):
            raise ValueError(f"a graph decode step takes input_ids of shape [{bsz}, 1], got {tuple(input_ids.shape)}")
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("position_ids", position_ids)):
            if value is not None and value.device != self.device:
                raise ValueError(f"{name} is on {value.device}, the cache on {self.device}")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != bsz):
            raise ValueError(f"attention_mask must be [batch={bsz}, past + 1], got {tuple(attention_mask.shape)}")
        if position_ids is not None and tuple(position_ids.shape) not in ((bsz, 1), (1, 1)):
            raise ValueError(f"position_ids must have shape [{bsz}, 1], got {tuple(position_ids.shape)}")
        kv.check_room(1)
        block = _UNCHANGED.get(model)
        if block is None or block is not self._checked_in:
            self._check_model(model)
            self._checked_in = block
        explicit = position_ids is not None
        self.input_ids.copy_(input_ids)
        if attention_mask is None:
            self.valid.fill_(True)
        else:
            torch.ne(attention_mask[:, -1:], 0, out=self.valid)
        if explicit:
            self.position_ids.copy_(position_ids.expand(bsz, 1))
        if explicit not in self._graphs:
            self._graphs[explicit] = self._capture(model, explicit)
        replay, logits = self._graphs[explicit]
        replay()
        kv.num_columns += 1
        self.replays += 1
        return logits.clone()
