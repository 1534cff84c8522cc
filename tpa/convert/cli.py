"""The ``tpa convert`` command group: one subcommand per source format, its parser declared here and
its handler importing the converter's module when it runs."""

from __future__ import annotations

from tpa.utils.args import add_output_argument, handler


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="turn other checkpoints into T6 directories",
                                   description="Convert a checkpoint of another code base into a T6 directory "
                                               "(verified against the source before it is written).")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    _register_official(sources)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _register_official(subparsers) -> None:
    from tpa.convert.official import DEFAULT_TOLERANCE

    p = subparsers.add_parser(
        "official", help="a checkpoint of the paper's code (github tensorgi/T6) -> a T6 directory",
        description="Convert a directory saved by the paper's training code (config.json with GPTConfig fields and "
                    "pytorch_model.bin or model.safetensors; models T6, T6_kvonly, llama-mha, llama-gqa (GQA or MQA), "
                    "llama-mla) into a T6 directory that T6ForCausalLM, transformers' Auto classes and lm-eval load. "
                    "The logits are checked against the official forward on a fixed batch before anything is written.")
    p.add_argument("src", help="the official checkpoint directory")
    add_output_argument(p, required=True, help="the T6 directory to write (must not exist or be empty)", dest="out")
    p.add_argument("--tokenizer", default=None, help="a local tokenizer directory to save with the model")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest accepted relative logit difference in the check (default %(default)g)")
    p.set_defaults(func=handler("tpa.convert.official", "_run"))
