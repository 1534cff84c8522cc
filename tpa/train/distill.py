"""Continued training of a converted model: ``tpa train --init-from DIR`` (start from a T6 model
directory, e.g. one made by ``tpa convert llama``) and ``--distill-from TEACHER`` (the student also
learns the teacher's next-token distributions).

The training loss becomes ``CE(student) + W * T^2 * KL(p_teacher^T || p_student^T)``, the KL
averaged over tokens, both distributions softened by the temperature ``T`` (Hinton et al. 2015; the
``T^2`` keeps the gradient scale independent of ``T``). The teacher is any causal LM directory that
``transformers.AutoModelForCausalLM`` loads (a T6 model, or the Llama a TPA model was converted from)
with the student's vocabulary; it runs in eval mode without gradients, and under FSDP it is sharded
per block like the student (each rank runs its own micro-batches through it under DDP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# TrainConfig fields that a resumed run must share with the checkpoint it continues
DISTILL_FIELDS = ("init_from", "distill_from", "distill_weight", "distill_temperature")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_tokens KL(softmax(teacher/T) || softmax(student/T))`` in float32.

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` (the same V).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def load_teacher(path: str | Path, device: torch.device, vocab_size: int) -> torch.nn.Module:
    """The frozen teacher (float32, eval mode, no gradients) on ``device``; its vocabulary must be the student's."""
    from transformers import AutoModelForCausalLM

    import tpa  # noqa: F401  (T6 teachers load through the Auto classes)

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--distill-from {path}: no config.json there (expected a model directory)")
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if teacher_vocab != vocab_size:
        raise ValueError(f"--distill-from {path}: the teacher's vocabulary has {teacher_vocab} tokens, the student's "
                         f"{vocab_size}; distillation compares next-token distributions over one vocabulary")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


class Distiller:
    """``distiller(student_logits, input_ids)`` -> the weighted KL term of the loss.

    Args:
        teacher: the module to call (already parallelised like the student where that applies).
        weight: W. temperature: T.
        autocast: the context factory the student's forward runs under.
    """

    def __init__(self, teacher: torch.nn.Module, weight: float, temperature: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.teacher, self.weight, self.temperature, self.autocast = teacher, weight, temperature, autocast

    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.teacher(input_ids=input_ids, use_cache=False).logits

    def __call__(self, student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight * distill_kl(student_logits, self.teacher_logits(input_ids), self.temperature)


def load_init_model(path: str | Path, data_vocab: int, seq_len: int):
    """The T6 model of ``--init-from`` (float32), checked against the data and the sequence length.

    Raises:
        ValueError: no such model directory, missing or unexpected weights, a vocabulary smaller than
            the data's tokenizer, or ``seq_len`` beyond the model's positions.
    """
    from tpa import T6Config, T6ForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--init-from {path}: no config.json there (expected a T6 model directory)")
    config = T6Config.from_pretrained(path)
    if config.vocab_size < data_vocab:
        raise ValueError(f"--init-from {path}: vocabulary of {config.vocab_size} tokens is smaller than the data's "
                         f"tokenizer ({data_vocab} tokens)")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"--init-from {path}: seq_len={seq_len} exceeds its max_position_embeddings="
                         f"{config.max_position_embeddings}")
    model, info = T6ForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"--init-from {path}: the weights do not match its config: {bad}")
    return config, model


def make_distiller(cfg, vocab_size: int, device: torch.device, parallel: str, world, bf16: bool,
                   autocast) -> Distiller | None:
    """The :class:`Distiller` of ``cfg.distill_from`` (None without one); under FSDP the teacher is
    sharded per block like the student, with the same mixed-precision policy."""
    if cfg.distill_from is None:
        return None
    from tpa.train.parallel import parallelize

    teacher = load_teacher(cfg.distill_from, device, vocab_size)
    if parallel == "fsdp":
        teacher = parallelize(teacher, parallel="fsdp", world=world, bf16=bf16, compile=False,
                              activation_checkpointing=False)
    return Distiller(teacher, cfg.distill_weight, cfg.distill_temperature, autocast)
