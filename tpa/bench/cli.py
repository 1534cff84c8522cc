"""``tpa bench ...`` (decode, memory, train, generate) and ``tpa ablate``: the benchmarks users run.

Each parser is declared here; its handler imports the benchmark's module when the command runs.
Developer benchmarks (profilers, launch sweeps) are in ``benchmarks/dev/``.
"""

from __future__ import annotations

import argparse

from tpa.utils.args import (add_command, add_command_group, add_device_argument, add_output_argument,
                            add_precision_argument, handler, module_doc)

DEFAULT_RANKS = ["16,1,1", "6,2,2"]


def register(subparsers) -> None:
    bench_sub = add_command_group(subparsers, "bench", dest="bench_command", metavar="BENCHMARK",
                                  help="benchmarks: decode kernel, KV-cache memory, training, generation, conversion")
    for register_one in (_register_decode, _register_memory, _register_train, _register_generate, _register_convert):
        register_one(bench_sub)
    _register_ablate(subparsers)


def _register_decode(subparsers) -> None:
    p = subparsers.add_parser(
        "decode",
        help="FlashTPA decoding kernel vs reference twin vs SDPA (MHA/GQA/MQA), Figure 5 grid",
        description=module_doc("tpa.bench.decode"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--d-model", type=int, nargs="+", default=[1024, 2048, 3072])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--min-len", type=int, default=1 << 12, help="smallest cache length (power of two)")
    p.add_argument("--max-len", type=int, default=1 << 19, help="largest cache length (power of two)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="cache lengths, in this order (instead of --min-len .. --max-len)")
    p.add_argument("--ranks", nargs="+", default=DEFAULT_RANKS, help="TPA ranks as R_q,R_k,R_v")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--baselines", nargs="*", default=["mha", "gqa4", "mqa", "mla"], choices=["mha", "gqa4", "mqa", "mla"],
                   help="baselines: SDPA decoding over K/V caches (mha gqa4 mqa) and MLA's absorbed decode over "
                        "its latent cache (mla: d_c 256, d_R 32)")
    p.add_argument("--reference-max-len", type=int, default=1 << 13, help="time the twin up to this length")
    p.add_argument("--reps", type=int, default=20, help="timed calls per point (fewer for slow points)")
    p.add_argument("--growing-steps", type=int, default=256)
    p.add_argument("--skip-check", action="store_true",
                   help="ignored (kept for old command lines): the kernel's GPU correctness checks are tests "
                        "now, `python -m pytest -m gpu tests/ops`")
    p.add_argument("--tune", action="store_true",
                   help="first choose the launch heuristic's constants by measurement (used for the rest of the run)")
    p.add_argument("--sweep", action="store_true",
                   help="only sweep explicit launch configurations (splits, stages, block, warps, PDL) at "
                        "the target points and write sweep.csv; no grid")
    p.add_argument("--block-h", type=int, nargs="+", default=[0],
                   help="time each TPA point with each of these heads per program (powers of two; 0: the launch "
                        "heuristic's); one decode.csv row per value (columns variant, block_h)")
    p.add_argument("--num-warps", type=int, nargs="+", default=[0],
                   help="the same for the split kernel's warps (0: the heuristic's)")
    p.add_argument("--pad-a-heads", type=int, nargs="+", default=[1], metavar="M",
                   help="the same for A-factor caches whose head dimension is padded to a multiple of M (views "
                        "of wider buffers: same values, H unchanged; 1: unpadded); see tpa.bench.decode.variants")
    p.add_argument("--pad-loads", choices=["padded", "h", "both"], default="padded",
                   help="with --pad-a-heads M > 1: the kernel's A loads read the padded rows (padded), only H heads "
                        "(h: the layout alone), or both variants")
    p.add_argument("--head-order", choices=["split", "heads", "both"], default="split",
                   help="with several head blocks: today's grid (split), the head blocks of a split side by side "
                        "(heads: they share the head-shared factors through L2), or both variants")
    p.add_argument("--grid-only", action="store_true", help="only the grid (no batch-1 latency, no growing run)")
    p.add_argument("--flush", choices=["read", "write"], default="read",
                   help="how the L2 cache is flushed before each timed call: by reading a buffer of 4x L2 (leaves "
                        "clean lines) or by rewriting it (leaves ~L2-size of dirty lines the timed call must write "
                        "back)")
    add_output_argument(p, default="runs/bench_decode", help="output folder", dest="out")
    p.set_defaults(func=handler("tpa.bench.decode", "main"))


def _register_memory(subparsers) -> None:
    from tpa.models.presets import ATTENTION_TYPES, PRESETS

    p = add_command(subparsers, "memory", module="tpa.bench.memory",
                    help="Table 1 (KV cache and attention parameters) for every preset and type; longest context")
    p.add_argument("--presets", nargs="+", default=["all"], help=f"presets ({', '.join(PRESETS)}) or all")
    p.add_argument("--types", nargs="+", default=["all"], help=f"attention types ({', '.join(ATTENTION_TYPES)}) or all")
    p.add_argument("--memory", default="80GB", help="memory budget: 80GB (10^9 bytes/GB), 80GiB, 512MiB, ...")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of weights and cache")
    p.add_argument("--measure", default="auto", choices=["auto", "on", "off"],
                   help="fill a real cache and compare (auto: on a GPU)")
    p.add_argument("--measure-preset", default=None, help="preset to measure (default: the first of --presets)")
    p.add_argument("--measure-tokens", type=int, default=4096, help="tokens per sequence in the measured cache")
    add_device_argument(p, help="device for --measure (cpu, cuda, auto)")
    add_output_argument(p, default="runs/bench/memory", help="output folder")


def _register_train(subparsers) -> None:
    p = add_command(subparsers, "train", module="tpa.bench.train",
                    help="training tokens/s, MFU and peak memory per attention type")
    p.add_argument("--preset", default="small", help="model preset (tiny, mini, small, medium, large, xl)")
    p.add_argument("--types", nargs="+", default=["all"], help="attention types, or all")
    p.add_argument("--loops", nargs="+", default=["trainer", "model-compile"], choices=["trainer", "model-compile"],
                   help="the project's trainer, and/or the user's loop around torch.compile(model)")
    p.add_argument("--data", default="data/shakespeare", help="token shards from `tpa data prepare` (trainer loop)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=50304, help="model vocabulary (>= the data's tokenizer)")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"],
                   help="trainer loop: torch.compile the blocks")
    p.add_argument("--reference", default="llama", choices=["llama", "none"],
                   help="model-compile loop: transformers' LlamaForCausalLM of the same size first")
    p.add_argument("--compile-backend", default="inductor",
                   help="model-compile loop: torch.compile backend (aot_eager checks the loop without codegen)")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="model-compile loop: torch.compile mode (reduce-overhead: CUDA graphs, which take the "
                        "host's launch time out of each step)")
    add_precision_argument(p)
    add_device_argument(p)
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: known GPUs)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later runs are skipped")
    p.add_argument("--profile", action="store_true",
                   help="model-compile loop: 3 more steps under torch.profiler after the timed ones, "
                        "OUTPUT/profile_MODEL_TYPE.txt (kernels by GPU time)")
    add_output_argument(p, default="runs/bench/train", help="output folder")


def _register_generate(subparsers) -> None:
    p = add_command(subparsers, "generate", module="tpa.bench.generate",
                    help="end-to-end generation tokens/s and peak memory per attention type")
    p.add_argument("--preset", default="small", help="model preset (tiny, mini, small, ...)")
    p.add_argument("--types", nargs="+", default=["tpa", "mha", "gqa", "mla", "llama"],
                   help="attention types, llama (transformers' LlamaForCausalLM at gqa's width, depth and KV heads), "
                        "llama-mha and llama-mqa (the same at mha's and mqa's KV heads), or all")
    p.add_argument("--contexts", nargs="+", default=["4K", "32K", "128K"], help="prompt lengths (4K = 4096)")
    p.add_argument("--batch-sizes", nargs="+", default=["1", "8"], help="sequences per generate call")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (the long run)")
    p.add_argument("--short-tokens", type=int, default=None,
                   help="tokens of the short run; decode time = long minus short run (default new-tokens // 8, >= 1)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward call")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else float32), float32, bfloat16")
    p.add_argument("--decode-impl", default="auto", choices=["auto", "kernel", "reference"],
                   help="TPA decoding: FlashTPA kernel on CUDA (auto), always the kernel, or the reference path")
    add_device_argument(p)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps as CUDA-graph replays over a static cache (default: on with CUDA, off on CPU)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="skip points whose batch x context exceeds this (bounds the prefill time)")
    p.add_argument("--cache-head-multiple", type=int, nargs="+", default=None, metavar="M",
                   help="TPA types: also a TYPE-padM row per M > 1, its A-factor caches padded to a multiple of M "
                        "heads (T6Config.tpa_cache_head_multiple; 1 keeps the plain row, e.g. 1 16)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later points are skipped")
    add_output_argument(p, default="runs/bench/generate", help="output folder")


def _register_ablate(subparsers) -> None:
    p = add_command(subparsers, "ablate", module="tpa.bench.ablate",
                    help="train every attention type side by side; loss plot and table")
    p.add_argument("--data", default="data/shakespeare", help="token shards from `tpa data prepare`")
    p.add_argument("--preset", default="tiny", help="model preset (tiny for a CPU, mini ~30-50M parameters, small)")
    p.add_argument("--types", nargs="+", default=None,
                   help="attention types, or all (the default when no --row/--rows is given)")
    p.add_argument("--row", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                   help="a row of the grid, e.g. tpa_r1:attention_type=tpa,k_rank=1,v_rank=1 (repeatable; keys: "
                        "attention_type, T6Config fields, lr, min_lr, heads_of=TYPE, match_params=true|head_dim|false)")
    p.add_argument("--rows", action="append", default=None, metavar="FILE",
                   help="a YAML file of rows (`rows:` a list of mappings with a `name`), e.g. studies/ranks.yaml")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200)")
    budget.add_argument("--tokens", type=int, default=None, help="training tokens per run (rounded up to whole steps)")
    _add_batch_arguments(p)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of the steps)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation losses (default: 10 per run)")
    p.add_argument("--eval-sequences", type=int, default=64, help="validation sequences per evaluation")
    p.add_argument("--seed", type=int, default=None,
                   help="the seed of a one-seed ablation (default 0); the same as --seeds SEED")
    p.add_argument("--seeds", nargs="+", default=None, metavar="SEED",
                   help="seeds (distinct, >= 0): every row is trained once per seed; seed s initialises the "
                        "model with s and orders the data with --data-seed + s")
    p.add_argument("--data-seed", type=int, default=0,
                   help="data-order seed of seed 0 (seed s uses data seed + s; the same for every row)")
    add_device_argument(p)
    add_precision_argument(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--export", action="store_true", help="export each trained model (RUN/final) for tpa eval")
    p.add_argument("--no-plot", action="store_true", help="skip the plot (e.g. where matplotlib is missing)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved rows (heads, parameters, FLOPs per token) and the number of runs; "
                        "train nothing")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep the finished runs of the ablation in --output (same settings) and train the "
                            "missing (row, seed) runs")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the ablation in --output (its runs/ folder is deleted)")
    p.add_argument("--replot", metavar="DIR", nargs="+", default=None,
                   help="only redraw plot and tables from DIR/ablation.json; with several folders (of the same "
                        "settings, different seeds or rows) merge them into --output")
    add_output_argument(p, help="output folder (default runs/ablate; with --replot: DIR, or the merged folder)")


def _register_convert(subparsers) -> None:
    from tpa.bench.convert import DEFAULT_OUTPUT

    p = add_command(subparsers, "convert", module="tpa.bench.convert",
                    help="convert a trained MHA model to TPA at several ranks, distil, compare with training from "
                         "scratch")
    p.add_argument("--data", default="data/shakespeare", help="token shards from `tpa data prepare`")
    p.add_argument("--preset", default="tiny", help="model preset of the teacher (tiny, mini, small, ...)")
    p.add_argument("--ranks", default="1,2", help="R_k = R_v of the converted models, comma-separated")
    p.add_argument("--teacher-steps", type=int, default=400, help="optimizer steps of the teacher (and of (d))")
    p.add_argument("--distill-fraction", type=float, default=0.1,
                   help="distillation steps (and those of (c)) as a fraction of the teacher's")
    _add_batch_arguments(p)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the runs from scratch")
    p.add_argument("--distill-lr", type=float, default=3e-4, help="peak learning rate of the distillation")
    p.add_argument("--distill-weight", type=float, default=1.0, help="W of the KL term")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="T of the KL term")
    p.add_argument("--calibration-tokens", type=int, default=16384, help="calibration tokens of the conversion")
    p.add_argument("--eval-sequences", type=int, default=64, help="validation sequences per evaluation")
    add_device_argument(p)
    add_precision_argument(p)
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --output")
    add_output_argument(p, default=DEFAULT_OUTPUT, help=f"output folder (default {DEFAULT_OUTPUT})")


def _add_batch_arguments(p) -> None:
    """The batch shape of the training runs of ``tpa ablate`` and ``tpa bench convert``."""
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass (default: --batch-size)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
