"""The ``tpa convert`` command group: one subcommand per source format, its parser declared here and
its handler importing the converter's module when it runs."""

from __future__ import annotations

from tpa.utils.args import add_command, add_command_group, add_output_argument


def register(subparsers) -> None:
    sources = add_command_group(subparsers, "convert", dest="source", metavar="SOURCE",
                                help="turn other checkpoints into T6 directories",
                                description="Convert a checkpoint of another code base into a T6 directory "
                                            "(verified against the source before it is written).")
    _register_official(sources)
    _register_llama(sources)


def _register_official(subparsers) -> None:
    from tpa.convert.official import DEFAULT_TOLERANCE

    p = add_command(
        subparsers, "official", module="tpa.convert.official",
        help="a checkpoint of the paper's code (github tensorgi/T6) -> a T6 directory",
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


def _register_llama(subparsers) -> None:
    p = add_command(
        subparsers, "llama", module="tpa.convert.llama",
        help="a Llama/Mistral-style HF checkpoint or a T6 mha/gqa/mqa directory -> TPA",
        description="Convert a local LlamaForCausalLM/MistralForCausalLM checkpoint (MHA or GQA, RoPE, no biases) or a "
                    "T6 mha/gqa/mqa directory into a T6 TPA model. Embeddings, norms, MLPs and the output projection "
                    "are carried over; attention becomes TPA-KVonly (or TPA with --q-rank). --exact writes the "
                    "lossless model (rank = key/value heads, fixed head factors); otherwise ranks below that get "
                    "contextual factors fitted on calibration tokens, and the errors are reported per layer.")
    p.add_argument("src", metavar="SRC_DIR", help="source model directory (config.json + safetensors)")
    add_output_argument(p, required=True, help="output directory (must not exist or be empty; written atomically)",
                        dest="out")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--exact", action="store_true", help="the exact conversion: logits equal the source's")
    p.add_argument("--k-rank", type=int, default=None, help="key rank R_k (default 2, below the key/value heads)")
    p.add_argument("--v-rank", type=int, default=None, help="value rank R_v (default 2, below the key/value heads)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--q-rank", type=int, default=None, help="factorise the query too, at rank R_q (full TPA)")
    q.add_argument("--kv-only", action="store_true", help="keep the source's query projection (TPA-KVonly; default)")
    p.add_argument("--calibration", default=None, metavar="DATA_DIR",
                   help="a `tpa data prepare` folder tokenized with the model's tokenizer (default: random tokens)")
    p.add_argument("--calibration-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--calibration-seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--fit-methods", default="svd,als", help="factor initialisations to try, best kept (default svd,als)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random calibration tokens")
