"""Host time of one decode step, part by part: what runs on the CPU per generated token of
``tpa bench generate`` (static cache, CUDA-graph decoding, greedy), apart from the GPU's work.

Parts (each timed per step, over ``--steps`` steps, median of ``--repeats`` repeats):

- ``check``: ``DecodeGraph``'s per-step check that the captured graph still fits the model: its
  ``_ModelWatch`` (a few C-level passes), or on a tree from before the watch (commits up to
  a5ee544) the walk of ``model.parameters()`` in ``DecodeGraph._key`` that every step made there.
- ``runner``: ``model(input_ids=token, cache=cache)`` routed to ``DecodeGraph.step`` (input checks,
  copies into the static inputs, the replay, the copy of the logits).
- ``generate``: one step of ``model.generate`` over that cache: transformers' loop (inputs
  preparation, logits processors, stopping criteria with its host sync, ``attention_mask``/``position_ids`` growth)
  plus ``runner``; the difference of a ``--steps``-token and a 2-token generation, per token.
- ``forward``: the eager static step, ``T6Model.forward`` and the layers without a graph (on the
  CPU this includes the arithmetic: use a tiny preset for it).

``--replay fake`` (the default on the CPU, where CUDA graphs do not exist) replaces the graph
capture by one eager step and the replay by nothing, so ``runner`` and ``generate`` are host work
only; ``--replay real`` (the default on CUDA) replays the captured graph, and a step is timed with
the GPU idle at its start (``runner``) or as wall time (``generate``, which syncs every step).
``--replay fake`` on CUDA gives the host work of the same loop without the GPU. ``--clock cpu``
times with this process's CPU time (on a CPU shared with other jobs); ``--counts`` adds the number of
Python/builtin function calls and aten ops per step, which compare two commits exactly where timings
are noisy.

    OMP_NUM_THREADS=1 python benchmarks/dev/host_step.py --device cpu --preset small --parts check runner generate
    OMP_NUM_THREADS=1 python benchmarks/dev/host_step.py --device cpu --preset tiny --parts forward
    python benchmarks/dev/host_step.py --context 32768 --out $OUT/host_step          # on a GPU: real replays
    python benchmarks/dev/host_step.py --replay fake --out $OUT/host_step_fake        # on a GPU: host only

Prints one row per type (microseconds per step) and, with ``--out DIR``, writes ``host_step.json``.
It runs against any checkout of the package on ``PYTHONPATH`` that has ``tpa.models.t6.decode_graph``
(to compare two commits, run it from this file with each tree first on the path).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from tpa import T6Cache, T6Config, T6ForCausalLM
from tpa.models.t6.decode_graph import DecodeGraph
from tpa.models.t6.hf_compat import cache_kwargs
from tpa.utils.runinfo import run_metadata

PARTS = ("check", "runner", "generate", "forward")


class FakeReplay(DecodeGraph):
    """A DecodeGraph whose capture is one eager step and whose replay does nothing: its ``step``
    is the runner's host work alone (the logits are the captured step's, every step)."""

    def _record(self, run, undo):
        out = run()
        undo()
        return (lambda: None), out


def cpu_model() -> str | None:
    """The host CPU's model name (Linux), to tell two machines' host times apart."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(kind: str, preset: str, device, dtype, max_positions: int) -> T6ForCausalLM:
    cfg = T6Config.from_preset(preset, kind, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    with torch.device(device):
        model = T6ForCausalLM(cfg)
    return model.to(dtype).eval()


def graph_cache(model, batch: int, capacity: int, replay: str):
    """A static cache whose one-token steps go through a DecodeGraph (real or fake replays)."""
    real = replay == "real"
    cache = T6Cache.for_model(model, batch, capacity=capacity, static=True, cuda_graphs=real or None)
    if not real:
        cache.decode_graph = FakeReplay(cache)
    return cache


def _prefill(model, cache, ids) -> torch.Tensor:
    with torch.no_grad():
        for piece in ids.split(2048, dim=1):
            out = model(input_ids=piece, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time: on a shared
# machine it leaves out the time spent waiting for a core)


def per_step_us(step, steps: int, repeats: int, before_repeat, device, idle_gpu: bool) -> float:
    """Median over ``repeats`` of the mean microseconds of ``step()``; ``before_repeat()`` runs
    untimed before each repeat. ``idle_gpu``: each step is timed alone, after a device sync."""
    results = []
    for _ in range(repeats):
        before_repeat()
        _sync(device)
        if idle_gpu and device.type == "cuda":
            total = 0.0
            for _ in range(steps):
                torch.cuda.synchronize(device)
                t0 = CLOCK()
                step()
                total += CLOCK() - t0
        else:
            t0 = CLOCK()
            for _ in range(steps):
                step()
            _sync(device)
            total = CLOCK() - t0
        results.append(1e6 * total / steps)
    return statistics.median(results)


class _OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def work(fn) -> tuple[int, int]:
    """``(Python and builtin function calls, aten ops)`` of one ``fn()`` each (two calls): counts,
    not times, so two commits compare exactly on a machine whose timings are noisy."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    with _OpCount() as counter:
        fn()
    return pstats.Stats(prof).total_calls, counter.ops


class Parts:
    """The steps of one type's model, each a callable, and how to put the cache back before a
    repeat. The runner's cache keeps its captured graph over resets."""

    def __init__(self, kind: str, args, device, dtype):
        self.args, self.device = args, device
        capacity = args.context + args.steps + 8
        self.model = build(kind, args.preset, device, dtype, capacity + 8)
        self.ids = torch.randint(0, self.model.config.vocab_size, (args.batch, args.context), device=device)
        self.cache = graph_cache(self.model, args.batch, capacity, args.replay)
        self.token = self.prefilled()
        self.runner()  # the capture
        if "forward" in args.parts:
            self.eager = T6Cache.for_model(self.model, args.batch, capacity=capacity, static=True,
                                           cuda_graphs=False)
            self.eager_prefilled()
            self.forward()  # lazy initialisations

    def prefilled(self):
        """The runner's cache holding the prompt but its last token; returns the next token."""
        self.cache.reset()
        return _prefill(self.model, self.cache, self.ids[:, :-1])

    def eager_prefilled(self):
        self.eager.reset()
        _prefill(self.model, self.eager, self.ids[:, :-1])

    def check(self):
        watch = getattr(self.cache.decode_graph, "_watch", None)
        if watch is not None:
            watch.unchanged(self.model)
        else:  # a tree from before the watch: the step walks the parameters
            DecodeGraph._key(self.model)

    def runner(self):
        self.model(input_ids=self.token, **cache_kwargs(self.cache), use_cache=True)

    def forward(self):
        self.model(input_ids=self.token, **cache_kwargs(self.eager), use_cache=True)

    def generate(self, n: int) -> float:
        """Seconds of a prefilled ``generate`` of ``n`` tokens (the prefill untimed)."""
        self.prefilled()
        _sync(self.device)
        t0 = CLOCK()
        out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), **cache_kwargs(self.cache),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(self.device)
        elapsed = CLOCK() - t0
        if out.shape[1] != self.ids.shape[1] + n:
            raise RuntimeError(f"generate returned {out.shape[1] - self.ids.shape[1]} tokens, expected {n}")
        return elapsed

    def time(self, part: str) -> float:
        """Microseconds per step of ``part``; ``generate``: a ``--steps``-token run minus a 2-token
        run, per token, median over ``--repeats`` pairs."""
        args = self.args
        if part == "generate":
            self.generate(2)  # warm-up
            diffs = [(self.generate(args.steps) - self.generate(2)) / (args.steps - 2) for _ in range(args.repeats)]
            return 1e6 * statistics.median(diffs)
        before = {"check": lambda: None, "runner": self.prefilled, "forward": self.eager_prefilled}[part]
        return per_step_us(getattr(self, part), args.steps, args.repeats, before, self.device,
                           idle_gpu=part == "runner")

    def count(self, part: str) -> tuple[float, float]:
        """``(function calls, aten ops)`` per step of ``part`` (:func:`work`)."""
        if part == "generate":
            n = self.args.steps
            long, short = work(lambda: self.generate(n)), work(lambda: self.generate(2))
            return tuple((a - b) / (n - 2) for a, b in zip(long, short))
        {"check": lambda: None, "runner": self.prefilled, "forward": self.eager_prefilled}[part]()
        return work(getattr(self, part))


def time_type(kind: str, args, device, dtype) -> dict:
    parts = Parts(kind, args, device, dtype)
    row = {"attention_type": kind, "parameters": sum(p.numel() for p in parts.model.parameters())}
    for part in args.parts:
        row[part + "_us"] = parts.time(part)
        if args.counts:
            row[part + "_calls"], row[part + "_ops"] = parts.count(part)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="small")
    p.add_argument("--types", nargs="+", default=["tpa", "mha", "gqa", "mla"])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["check", "runner", "generate"])
    p.add_argument("--replay", choices=("real", "fake"), default=None,
                   help="real graph replays (CUDA only; the default there) or none (the default on the CPU)")
    p.add_argument("--context", type=int, default=64, help="prompt tokens (the cache holds them)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64, help="steps per repeat (generate: tokens of the long run)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (on a shared CPU machine; not with a GPU)")
    p.add_argument("--counts", action="store_true",
                   help="also count Python/builtin function calls and aten ops per step (exact, for comparing commits)")
    p.add_argument("--out", default=None, help="folder for host_step.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.replay = args.replay or ("real" if device.type == "cuda" else "fake")
    if args.replay == "real" and device.type != "cuda":
        p.error("--replay real needs a CUDA device")
    if args.steps < 3:
        p.error("--steps must be >= 3")
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    rows = []
    print(f"host time per decode step (us), preset {args.preset}, batch {args.batch}, context {args.context}, "
          f"{args.replay} replays, {args.clock} clock, {device}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.steps} steps x {args.repeats} repeats (median); CPU {cpu_model()}",
          flush=True)
    for kind in args.types:
        row = time_type(kind, args, device, dtype)
        rows.append(row)
        counts = lambda part: f" ({row[part + '_calls']:.0f} calls, {row[part + '_ops']:.0f} ops)"  # noqa: E731
        cells = "  ".join(f"{part} {row[part + '_us']:8.1f}" + (counts(part) if args.counts else "")
                          for part in args.parts)
        print(f"  {kind:10s} {cells}", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"replay": args.replay, "clock": args.clock, "preset": args.preset, "batch": args.batch,
                  "context": args.context, "steps": args.steps, "repeats": args.repeats, "cpu_model": cpu_model(),
                  "rows": rows, "run": run_metadata(device)}
        (out / "host_step.json").write_text(json.dumps(record, indent=1))
        print(f"wrote {out / 'host_step.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
