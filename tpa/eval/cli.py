"""``tpa eval ppl`` and ``tpa eval harness``: perplexity and lm-evaluation-harness benchmarks of a saved model."""

from __future__ import annotations

import argparse

from tpa.utils.args import add_command_group, add_output_argument, reporting_usage_errors


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count or fraction, got {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def register(subparsers) -> None:
    sub = add_command_group(subparsers, "eval", help="evaluate a model directory: perplexity, lm-evaluation-harness",
                            dest="eval_command", metavar="EVALUATION")

    p = sub.add_parser(
        "ppl",
        help="loss and perplexity on token shards or text files",
        description="Mean next-token loss and perplexity of a saved model on `tpa data prepare` token shards "
                    "(one split) or .txt files (tokenized with the model's tokenizer). Writes ppl.json and ppl.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory (save_pretrained output with its tokenizer)")
    p.add_argument("--data", required=True, nargs="+", help="token-shard folders and/or .txt files or folders")
    p.add_argument("--split", default="val", help="split of token-shard folders")
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens predicted per window (default: the model's max_position_embeddings)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it), float32, bfloat16, float16")
    add_output_argument(p, help="output folder (default runs/eval/ppl-MODELNAME)")
    p.set_defaults(func=_ppl)

    h = sub.add_parser(
        "harness",
        help="lm-evaluation-harness tasks, table in the paper's format",
        description="Run lm-evaluation-harness tasks on a saved model (0-shot and few-shot) and write "
                    "harness.json and harness.md (tasks as columns, acc_norm for ARC-E/ARC-C/HellaSwag/OBQA/"
                    "PIQA/SciQ and acc for the others, as the paper reports). `--tasks paper` runs the "
                    "paper's nine benchmarks (needs network access for their datasets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    h.add_argument("--model", required=True, help="model directory (save_pretrained output with its tokenizer)")
    h.add_argument("--tasks", required=True, nargs="+",
                   help="lm-eval task or group names (comma or space separated), or 'paper'")
    h.add_argument("--num-fewshot", type=int, nargs="+", default=[0],
                   help="few-shot counts, one evaluation each (the paper: 0 2)")
    h.add_argument("--batch-size", type=_positive_int, default=1, help="lm-eval batch size")
    h.add_argument("--limit", type=_limit, default=None,
                   help="documents per task (a count, or a fraction below 1); for quick checks only")
    h.add_argument("--include-path", nargs="+", default=None, help="folders with local task YAML files")
    h.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    h.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it), float32, bfloat16, float16")
    h.add_argument("--bootstrap-iters", type=int, default=1000, help="bootstrap resamples for standard errors")
    h.add_argument("--offline", action="store_true", help="never reach the network (local tasks and data only)")
    add_output_argument(h, help="output folder (default runs/eval/harness-MODELNAME)")
    h.set_defaults(func=_harness)


@reporting_usage_errors
def _ppl(args) -> int:
    from tpa.eval.ppl import run_ppl

    run_ppl(args.model, args.data, split=args.split, seq_len=args.seq_len, batch_size=args.batch_size,
            max_tokens=args.max_tokens, device=args.device, dtype=args.dtype, output=args.output)
    return 0


@reporting_usage_errors
def _harness(args) -> int:
    from tpa.eval.harness import go_offline, run_harness
    from tpa.utils.args import parse_list

    if args.offline:
        go_offline()
    run_harness(args.model, parse_list(args.tasks, None, "task"), num_fewshot=args.num_fewshot,
                batch_size=args.batch_size, limit=args.limit, device=args.device, dtype=args.dtype,
                output=args.output, include_path=args.include_path, bootstrap_iters=args.bootstrap_iters)
    return 0
