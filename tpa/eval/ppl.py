"""Loss and perplexity of a saved model on token shards or text files (``tpa eval ppl``).

The tokens of all inputs are concatenated into one stream and cut into windows of ``seq_len + 1``
tokens that overlap by one token (``[0, T]``, ``[T, 2T]``, ...; the last window may be shorter), the
way ``tpa train`` cuts its validation windows. Every token after the first is predicted exactly once,
from the tokens before it in its window, so the result is the mean next-token cross-entropy over
``N - 1`` predictions and ``perplexity = exp(loss)``.

Inputs:

- a folder written by ``tpa data prepare`` (``meta.json`` plus ``*.bin`` token shards): the tokens
  of one split (``--split``, default ``val``), read memory-mapped. The folder's tokenizer must be the
  model's tokenizer (same vocabulary), otherwise the ids mean different things and it is an error;
- text files (``.txt``), or folders searched for them: each file is one document, tokenized with the
  model's tokenizer and preceded by its bos token (eos when it has none), as ``tpa data prepare``
  stores documents.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tpa.utils.args import UsageError


@dataclass
class TokenStream:
    """Token ids to evaluate and where they came from."""

    tokens: np.ndarray  # int64 [N]
    sources: list[str] = field(default_factory=list)
    kind: str = "text"  # "shards" or "text"


def _is_shard_folder(path: Path) -> bool:
    return path.is_dir() and (path / "meta.json").is_file()


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".txt":
            raise UsageError(f"{str(path)!r}: only .txt files (or a `tpa data prepare` folder) can be evaluated")
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise UsageError(f"{str(path)!r} holds neither token shards (meta.json) nor .txt files")
    return files


def _same_tokenizer(data_dir: Path, meta: dict, tokenizer) -> None:
    from transformers import AutoTokenizer

    tok_dir = data_dir / meta.get("tokenizer", "tokenizer")
    try:
        data_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer of the token shards in {str(tok_dir)!r}: {err}") from None
    if data_tok.get_vocab() != tokenizer.get_vocab():
        raise UsageError(
            f"the token shards in {str(data_dir)!r} were made with another tokenizer than the model's "
            f"({len(data_tok)} vs {len(tokenizer)} tokens, different vocabularies): their ids mean other "
            "words to this model. Evaluate text files instead, or prepare the data with the model's "
            "tokenizer (tpa data prepare ... --tokenizer MODEL_DIR)")


def load_stream(paths: list[str | os.PathLike], tokenizer, *, split: str = "val") -> TokenStream:
    """Read and concatenate the tokens of ``paths`` (token-shard folders and/or text files/folders).

    Raises:
        UsageError: a missing path, a folder with neither shards nor text, a shard split that does
            not exist, or shards made with another tokenizer.
    """
    from tpa.data.loader import TokenShards
    from tpa.data.prepare import read_meta
    from tpa.data.sources import DataError

    if not paths:
        raise UsageError("no --data given")
    pieces: list[np.ndarray] = []
    sources: list[str] = []
    kinds = set()
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UsageError(f"--data {str(path)!r} does not exist")
        if _is_shard_folder(path):
            try:
                meta = read_meta(path)
                shards = TokenShards(path, split)
            except DataError as err:
                raise UsageError(str(err)) from None
            _same_tokenizer(path, meta, tokenizer)
            pieces.append(shards.read(0, shards.num_tokens) if shards.num_tokens else np.zeros(0, np.int64))
            sources.append(f"{path} [{split}]")
            kinds.add("shards")
            continue
        for file in _text_files(path):
            text = file.read_text(encoding="utf-8", errors="replace")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if sep is not None:
                ids = [sep] + ids
            pieces.append(np.asarray(ids, dtype=np.int64))
            sources.append(str(file))
            kinds.add("text")
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return TokenStream(tokens=tokens, sources=sources, kind="+".join(sorted(kinds)))


def windows(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the windows of at most ``seq_len + 1`` tokens that cover the stream,
    overlapping by one token, so that every token after the first is a target exactly once."""
    if seq_len < 1:
        raise UsageError(f"--seq-len must be >= 1, got {seq_len}")
    out = []
    for start in range(0, max(num_tokens - 1, 0), seq_len):
        out.append((start, min(seq_len + 1, num_tokens - start)))
    return out


def evaluate_tokens(model, tokens: np.ndarray, *, seq_len: int, batch_size: int = 8, progress: bool | None = None,
                    desc: str = "ppl") -> dict:
    """Mean next-token loss and perplexity of ``model`` on ``tokens`` (see the module docstring).

    Args:
        model: a causal LM returning ``.logits [B, T, V]``; evaluated without gradients.
        tokens: int64 ``[N]`` token ids, ``N >= 2``, all below the model's vocabulary size.
        seq_len: predicted tokens per window (at most the model's ``max_position_embeddings``).
        batch_size: windows per forward pass.
        progress: show a tqdm bar (None: when stderr is a terminal).

    Returns:
        ``{"loss", "perplexity", "tokens" (predictions), "windows", "seconds", "tokens_per_s"}``.
    """
    import torch
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    n = int(len(tokens))
    if n < 2:
        raise UsageError(f"need at least 2 tokens to evaluate, got {n}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise UsageError(f"the data holds token ids up to {int(tokens.max())}, outside the model's vocabulary "
                         f"of {vocab}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")
    device = next(model.parameters()).device
    spans = windows(n, seq_len)
    groups: list[list[tuple[int, int]]] = []
    full = [s for s in spans if s[1] == seq_len + 1]
    for i in range(0, len(full), batch_size):
        groups.append(full[i : i + batch_size])
    groups += [[s] for s in spans if s[1] != seq_len + 1]  # the last, shorter window
    total, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n - 1, desc=desc, unit="tok", disable=None if progress is None else not progress,
               dynamic_ncols=True)
    model.eval()
    with torch.no_grad():
        for group in groups:
            rows = torch.from_numpy(np.stack([tokens[s : s + length] for s, length in group])).to(device)
            logits = model(input_ids=rows[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            predicted = rows[:, 1:].numel()
            count += predicted
            bar.update(predicted)
            bar.set_postfix(loss=f"{total / count:.4f}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": count,
            "windows": len(spans), "seconds": seconds, "tokens_per_s": count / seconds if seconds > 0 else None}


def run_ppl(model_dir: str, data: list[str], *, split: str = "val", seq_len: int | None = None, batch_size: int = 8,
            max_tokens: int | None = None, device: str = "auto", dtype: str = "auto", output: str | None = None,
            progress: bool | None = None, argv: list[str] | None = None) -> dict:
    """``tpa eval ppl``: evaluate, print a table and write ``ppl.json`` and ``ppl.md`` under ``output``."""
    from tpa.models.t6.loading import load_model_and_tokenizer, model_label
    from tpa.utils.devices import resolve_device, resolve_dtype
    from tpa.utils.files import atomic_write_json, atomic_write_text, print_written
    from tpa.utils.runinfo import run_metadata
    from tpa.utils.tables import fmt_float, fmt_int, markdown_table

    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2, got {max_tokens}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model, tokenizer = load_model_and_tokenizer(model_dir, dev, torch_dtype)
    stream = load_stream(data, tokenizer, split=split)
    tokens = stream.tokens if max_tokens is None else stream.tokens[:max_tokens]
    limit = getattr(model.config, "max_position_embeddings", 1024)
    seq_len = limit if seq_len is None else seq_len
    result = evaluate_tokens(model, tokens, seq_len=seq_len, batch_size=batch_size, progress=progress)
    record = {
        "model": str(model_dir),
        "data": stream.sources,
        "data_kind": stream.kind,
        "split": split if "shards" in stream.kind else None,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "dtype": str(torch_dtype).replace("torch.", ""),
        **result,
        "run": run_metadata(dev, argv),
    }
    name = model_label(model_dir)
    out = Path(output or Path("runs") / "eval" / f"ppl-{name.replace('/', '-')}")
    table = markdown_table(
        ["model", "data", "tokens", "loss", "perplexity", "tokens/s"],
        [[name, ", ".join(data), fmt_int(result["tokens"]), fmt_float(result["loss"], 4),
          fmt_float(result["perplexity"], 3), fmt_int(round(result["tokens_per_s"] or 0))]])
    header = (f"Perplexity of `{model_dir}` ({record['dtype']}, seq_len {seq_len}) on {record['run']['device_name']}, "
              f"{record['run']['date']}.\n\n")
    paths = [atomic_write_json(out / "ppl.json", record), atomic_write_text(out / "ppl.md", header + table)]
    print(table, end="")
    print_written(paths)
    return record
