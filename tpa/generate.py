"""``tpa generate``: stream text from a trained model directory with ``model.generate`` and its KV cache."""

from __future__ import annotations

import re
import sys
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


def check_model_dir(model_dir: str) -> None:
    """A local model folder must exist and hold config.json and a tokenizer; say what is missing.
    A name that is not a local path but could be a HuggingFace hub id (``owner/name``) is left to the hub."""
    path = Path(model_dir)
    if not path.exists():
        if _HUB_ID.fullmatch(model_dir) and not model_dir.startswith("."):
            return
        raise ValueError(f"--model {model_dir}: no such folder")
    if not path.is_dir():
        raise ValueError(f"--model {model_dir} is a file; give the model folder (config.json, weights, tokenizer)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model_dir} has no config.json: not a saved model folder (e.g. RUN_DIR/final "
                         "or RUN_DIR/export_step_N of `tpa train`)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ValueError(f"--model {model_dir} has no tokenizer (tokenizer.json or tokenizer_config.json); "
                         "`tpa train` exports write it next to the weights")


def generate_text(model_dir: str, prompt: str = "", *, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 50, top_p: float = 1.0, greedy: bool = False, seed: int = 0, device: str = "auto",
                  dtype: str = "auto", stream: bool = True, cuda_graphs: bool | None = None, tp: int = 1) -> str:
    """Generate a continuation of ``prompt``; print it as it comes when ``stream``; return the new text.

    ``cuda_graphs``: for T6 models, decode with a static cache whose one-token steps replay a
    captured CUDA graph (``generate(cache_implementation="static")``); ``None``: on with CUDA.
    ``tp``: tensor-parallel ranks (:mod:`tpa.parallel`; every rank of a torchrun launch of ``tp``
    processes calls this); only rank 0 streams. The tokens are those of one process."""
    import torch
    from transformers import TextStreamer

    from tpa.models.t6.loading import load_model_and_tokenizer
    from tpa.utils.devices import resolve_device, resolve_dtype

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"--temperature must be > 0 when sampling (use --greedy for argmax), got {temperature}")
    dev = resolve_device(device)
    if cuda_graphs and dev.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")
    mesh = None
    if tp != 1:
        if cuda_graphs:
            raise ValueError("--cuda-graphs is not implemented with --tp (a captured step would hold collectives)")
        cuda_graphs = False
        from tpa.parallel import setup_tensor_parallel

        created_group = not torch.distributed.is_initialized()
        mesh, rank_device = setup_tensor_parallel(tp, device)
        dev = torch.device(rank_device)
        stream = stream and torch.distributed.get_rank() == 0
    check_model_dir(model_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, dev, resolve_dtype(dtype, dev))
    is_t6 = getattr(model.config, "model_type", None) == "t6"
    if mesh is not None:
        if not is_t6:
            raise ValueError(f"--tp is implemented for T6 models, not {model.config.model_type!r}")
        from tpa.parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh)
    if cuda_graphs and not is_t6:
        raise ValueError(f"--cuda-graphs is implemented for T6 models, not {model.config.model_type!r}")
    graphs = is_t6 and dev.type == "cuda" if cuda_graphs is None else cuda_graphs
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is not None and (ids.numel() == 0 or ids[0, 0].item() != bos):
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)  # documents start with bos in training
    if ids.numel() == 0:
        raise ValueError("empty prompt and the tokenizer has no bos/eos token to start from")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings {limit}")
    ids = ids.to(dev)
    torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature,
                                                       top_k=top_k if top_k > 0 else None, top_p=top_p)
    if graphs:
        kwargs["cache_implementation"] = "static"  # T6Cache(static=True): CUDA-graph decode steps
    if stream and prompt:
        print(prompt, end="", flush=True)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 use_cache=True, streamer=streamer, pad_token_id=tokenizer.pad_token_id or bos,
                                 **kwargs)
    finally:
        if mesh is not None and created_group:
            torch.distributed.destroy_process_group()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _run(args) -> int:
    try:
        generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed, device=args.device,
                      dtype=args.dtype, cuda_graphs=args.cuda_graphs, tp=args.tp)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
