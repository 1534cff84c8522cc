"""torchrun on CPUs (gloo): DDP and FSDP2 reproduce a one-process run with the same global batch (with
gradient accumulation: 4 micro-batches in one process, 2 per rank), on two ranks of one node and on two
simulated nodes (two torchrun launchers, LOCAL_RANK 0 on both, RANK 0 and 1), and an FSDP2 (DCP)
checkpoint resumes under torchrun and loads in one process. Spawned gloo ranks check how the wrappers
are set up: DDP's options and one all-reduce per bucket per optimizer step, FSDP2's resharding,
prefetching and mixed precision. The runs compared with one process start in few launches (train.multi_run):
starting the ranks costs more than training the tiny models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import REPO, subprocess_env
from train import dp_worker, multi_run
from train.conftest import read_metrics, tiny_config, train_losses
from tpa.models.presets import ATTENTION_TYPES
from tpa.train.trainer import train

STEPS = 6
COMMON = dict(global_batch_size=8, micro_batch_size=2, max_steps=STEPS, eval_every=3, checkpoint_every=3)



def _cli_args(data_dir: Path, run: Path, parallel: str, *extra: str) -> list[str]:
    """The `tpa train` arguments of the runs compared with one process (``tpa.cli.main``'s argv)."""
    return ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir", str(run), "--parallel", parallel,
            "--seq-len", "32", "--warmup-steps", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--eval-sequences", "16",
            "--log-every", "1", "--no-tensorboard", "--progress", "false", "--device", "cpu",
            *[str(a) for kv in COMMON.items() for a in ("--" + kv[0].replace("_", "-"), kv[1])], *extra]


def _train_args(data_dir: Path, run: Path, parallel: str, *extra: str) -> list[str]:
    return ["-m", "tpa.cli", *_cli_args(data_dir, run, parallel, *extra)]


def _torchrun(data_dir: Path, run: Path, parallel: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_train_args(data_dir, run, parallel, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    train(tiny_config(data_dir, run, **COMMON))
    return run


def _compare(run: Path, ref: Path, rtol: float) -> None:
    got, want = train_losses(run), train_losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rtol, abs=0), (step, got[step], want[step])
    vals = [(r["step"], r["val_loss"]) for r in read_metrics(run) if r.get("val_loss") is not None]
    ref_vals = [(r["step"], r["val_loss"]) for r in read_metrics(ref) if r.get("val_loss") is not None]
    assert [s for s, _ in vals] == [s for s, _ in ref_vals] == [0, 3, 6]
    for (_, a), (_, b) in zip(vals, ref_vals):
        assert a == pytest.approx(b, rel=rtol, abs=0)
    wa, wb = load_file(str(run / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


# the two-rank runs, all in one torchrun launch (train.multi_run): name -> (parallel, extra arguments)
TWO_RANK_RUNS = {
    "ddp": ("ddp", ()),
    # no accumulation on the ranks (4 sequences each): DDP's static graph, and many small buckets
    "ddp-static-graph-small-buckets": ("ddp", ("--micro-batch-size", "4", "--ddp-bucket-mb", "0.01")),
    "fsdp": ("fsdp", ()),
    "fsdp-implicit-prefetch": ("fsdp", ("--fsdp-prefetch", "0")),  # FSDP2's implicit prefetching only
    "fsdp-halted": ("fsdp", ("--halt-at-step", "3")),  # resumed by test_fsdp_checkpoint_resumes_and_reshards
}


@pytest.fixture(scope="module")
def two_rank_runs(data_dir, tmp_path_factory) -> tuple[Path, multi_run.Launch]:
    folder = tmp_path_factory.mktemp("two_ranks")
    runs = {name: _cli_args(data_dir, folder / name, parallel, *extra)
            for name, (parallel, extra) in TWO_RANK_RUNS.items()}
    return folder, multi_run.launch(runs, folder)


@pytest.mark.parametrize("name", [n for n in TWO_RANK_RUNS if n != "fsdp-halted"])
def test_two_ranks_match_one_process(name, two_rank_runs, single_run):
    folder, launched = two_rank_runs
    launched.check(name)
    _compare(folder / name, single_run, rtol=1e-5)


def _spawn(fn, *args) -> None:
    torch.multiprocessing.spawn(fn, args=(2, _free_port(), *[str(a) for a in args]), nprocs=2, join=True)


def test_ddp_and_fsdp_wrappers_are_set_up_as_asked(data_dir, tmp_path):
    """DDP: gradient accumulation over 4 micro-batches all-reduces in the last one only (``no_sync`` before):
    a comm hook sees each bucket once per optimizer step, not once per micro-batch; and the bucket size,
    bucket views and static graph (without accumulation only) reach the DDP wrapper. FSDP2: one reduction
    per unit per optimizer step, resharding, prefetching and mixed precision (dp_worker.fsdp_settings).
    Both in one spawn of two gloo ranks."""
    _spawn(dp_worker.wrapper_settings, data_dir, tmp_path / "run")


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_every_parameter_gets_a_gradient(attention_type):
    """DDP's ``static_graph`` (the default) assumes the same parameters get gradients every step: every
    parameter of every attention type does (tied embeddings included), so none is unused in any step."""
    from tpa import T6Config, T6ForCausalLM

    model = T6ForCausalLM(T6Config.from_preset("tiny", attention_type, vocab_size=96, max_position_embeddings=32))
    model(input_ids=torch.randint(0, 96, (2, 9)), use_cache=False).logits.float().square().mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_auto_parallel_rule(monkeypatch):
    """``parallel='auto'`` follows AUTO_PARALLEL by model size (DDP at every size today, as measured)."""
    from tpa.train import parallel as par

    two = par.Dist(rank=0, world_size=2)
    assert [par.resolve_parallel("auto", two, n) for n in (0, 124_000_000, 1_500_000_000)] == ["ddp"] * 3
    assert par.resolve_parallel("auto", par.Dist(), 124_000_000) == "none"
    monkeypatch.setattr(par, "AUTO_PARALLEL", ((0, "ddp"), (1_000_000_000, "fsdp")))
    assert [par.resolve_parallel("auto", two, n) for n in (124_000_000, 1_500_000_000)] == ["ddp", "fsdp"]


def test_compiled_ddp_needs_buckets_of_the_first_buckets_size():
    from tpa.train.parallel import DataParallelOptions, Dist, apply_ddp

    with pytest.raises(ValueError, match="at least DDP's first bucket"):
        apply_ddp(torch.nn.Linear(2, 2), Dist(), DataParallelOptions(ddp_bucket_mb=0.5), compiled=True)


@pytest.mark.parametrize("field,value", [("ddp_bucket_mb", 0), ("ddp_bucket_mb", float("inf")),
                                         ("fsdp_prefetch", -1), ("fsdp_prefetch", 1.5)])
def test_bad_data_parallel_options(field, value, data_dir, tmp_path):
    with pytest.raises(ValueError, match=field):
        tiny_config(data_dir, tmp_path / "run", **{field: value}).validate()


@pytest.fixture(scope="module")
def two_node_runs(data_dir, tmp_path_factory) -> tuple[Path, multi_run.Launch]:
    """DDP and FSDP2 on two simulated nodes of one rank each (in one launch of two torchrun launchers)."""
    folder = tmp_path_factory.mktemp("two_nodes")
    runs = {parallel: _cli_args(data_dir, folder / parallel, parallel) for parallel in ("ddp", "fsdp")}
    return folder, multi_run.launch_two_nodes(runs, folder)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_nodes_match_one_process(parallel, two_node_runs, single_run):
    """Two simulated nodes of one rank each (LOCAL_RANK 0, RANK 0 and 1): the global rank shards the data
    (else both ranks would train on the same half and the losses would differ), only RANK 0 writes metrics,
    run files and the export (metrics.jsonl has each step once), and each rank saves its own RNG state."""
    folder, launched = two_node_runs
    launched.check(parallel)
    run = folder / parallel
    _compare(run, single_run, rtol=1e-5)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == sorted(set(steps)) == list(range(STEPS + 1))
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{STEPS:08d}" / "rng").iterdir()) == \
        ["rank_00000.safetensors", "rank_00001.safetensors"]
    info = [json.loads(line) for line in (run / "run_info.jsonl").read_text().splitlines()]
    assert len(info) == 1 and info[0]["world_size"] == 2 and info[0]["parallel"] == parallel


def test_fsdp_checkpoint_resumes_and_reshards(single_run, two_rank_runs, data_dir, tmp_path):
    """An FSDP2 run halted at step 3 resumes under torchrun, and its DCP checkpoint loads in one process."""
    folder, launched = two_rank_runs
    launched.check("fsdp-halted")
    run = folder / "fsdp-halted"
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000003" / "rng").iterdir()) == \
        ["rank_00000.safetensors", "rank_00001.safetensors"]
    _torchrun(data_dir, run, "fsdp", "--resume")
    _compare(run, single_run, rtol=1e-5)
    # the sharded checkpoint at step 3 continues in a single process
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    os.symlink(run / "checkpoints" / "step_00000003", one / "checkpoints" / "step_00000003")
    result = train(tiny_config(data_dir, one, resume=True, **COMMON))
    assert result.step == STEPS
    got, want = train_losses(one), train_losses(single_run)
    for step in range(4, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0)


@pytest.mark.parametrize("device", ["cuda", "auto"])
@pytest.mark.parametrize("rank,local_rank,world_size", [(1, 0, 2), (3, 1, 4), (0, 0, 2)])
def test_gpu_device_is_local_rank_and_rank_is_global(device, rank, local_rank, world_size, monkeypatch):
    """On GPUs, rank r of a node takes cuda:LOCAL_RANK (not cuda:RANK, which does not exist on the second node),
    while rank, world size and the main process come from RANK / WORLD_SIZE. CUDA and the process group are
    stubbed: this checks only the choices setup_distributed makes."""
    import torch.distributed as dist

    from tpa.train.parallel import setup_distributed

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", torch.device(d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    world = setup_distributed(device)
    assert world.device == torch.device("cuda", local_rank) == calls["set_device"]
    assert (world.rank, world.local_rank, world.world_size) == (rank, local_rank, world_size)
    assert world.is_main == (rank == 0) and world.enabled
    assert calls["init"] == {"backend": "nccl", "device_id": torch.device("cuda", local_rank)}


@pytest.mark.gpu
@pytest.mark.parametrize("parallel,micro", [("ddp", "4"), ("ddp", "2"), ("fsdp", "2")],
                         ids=["ddp-static-graph", "ddp-accumulating", "fsdp"])
def test_two_gpus_compiled_bf16_match_one_gpu(parallel, micro, data_dir, tmp_path):
    """NCCL on two GPUs with compiled blocks in bf16 (dynamo's DDP optimizer splitting the block graphs
    at bucket boundaries; FSDP2 with bf16 all-gathers and prefetch): losses within bf16 rounding of one GPU's."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    gpu = ("--device", "auto", "--compile", "--precision", "bf16")
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, *_train_args(data_dir, one, "none", *gpu)], cwd=REPO, check=False,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = tmp_path / "run"
    _torchrun(data_dir, run, parallel, *gpu, "--micro-batch-size", micro)
    got, want = train_losses(run), train_losses(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-2), (step, got[step], want[step])


@pytest.mark.slow
@pytest.mark.parametrize("micro", ["4", "2"], ids=["static-graph", "accumulating"])
def test_compiled_ddp_matches_one_process(micro, single_run, data_dir, tmp_path):
    """Compiled blocks under DDP on CPUs (inductor; dynamo's DDP optimizer splits the block graphs at the
    1 MiB buckets): the losses of the eager one-process run, to inductor's float32 reordering."""
    run = tmp_path / "run"
    _torchrun(data_dir, run, "ddp", "--compile", "--micro-batch-size", micro, "--ddp-bucket-mb", "1")
    got, want = train_losses(run), train_losses(single_run)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got[step], want[step])
