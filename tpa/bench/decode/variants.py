"""Launch variants of ``tpa bench decode``: each TPA point timed per head block size, warp count and
A-cache layout (``--block-h``, ``--num-warps``, ``--pad-a-heads``, ``--pad-loads``), to tell the
cost of masked head rows from the cost of unaligned head-factor rows at head counts such as 34.

What the padded layout gives (``--pad-a-heads M``): the A caches are views ``buf[..., :H]`` of
buffers of ``Hp = ceil(H / M) * M`` heads per row, so their rank stride is ``Hp`` and their token
stride ``R * Hp`` elements (a multiple of M; with M = 8, rows start on 16-byte boundaries in 16-bit
dtypes). Triton specialises an integer argument that is divisible by 16 (and only then), so M = 16
tells the compiler that every A row starts 32-byte aligned, while M = 8 gives the alignment without
the hint unless ``R * Hp`` happens to be divisible by 16. The loads' head mask decides the vector
width as well: at ``r_h < 34`` it is constant over 2 heads only, so ``--pad-loads padded`` (default)
also lets the loads read the padded rows (:class:`tpa.ops.decode.DecodeLaunchOptions` ``a_head_pad``);
``h`` keeps the mask at H (the layout alone), ``both`` times the two. The bytes column stays the
logical (unpadded) count, so a padded variant's GB/s understates the bytes it moves.

Several head blocks (``--block-h`` below H) each read the head-shared factors ``b_k`` and ``b_v`` of
their tokens: from memory, unless the blocks of one split run at the same time and share them through
L2. ``--head-order heads`` launches them side by side (``DecodeLaunchOptions.heads_inner``); ``split``
(default) keeps today's grid, ``both`` times the two.
"""

from __future__ import annotations

import dataclasses
import itertools


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launch variant. ``block_h``/``num_warps`` None: the launch heuristic's; ``a_pad`` 1: the
    unpadded layout; ``padded_loads``: the A loads read the padded rows (``a_head_pad = a_pad``);
    ``heads_inner``: the grid order with the head blocks of a split side by side."""

    block_h: int | None = None
    num_warps: int | None = None
    a_pad: int = 1
    padded_loads: bool = False
    heads_inner: bool = False

    @property
    def is_default(self) -> bool:
        return self == Variant()

    @property
    def label(self) -> str:
        if self.is_default:
            return "default"
        parts = [f"bh{self.block_h}" if self.block_h else "", f"w{self.num_warps}" if self.num_warps else "",
                 f"pad{self.a_pad}{'' if self.padded_loads else '-maskH'}" if self.a_pad > 1 else "",
                 "heads" if self.heads_inner else ""]
        return "-".join(p for p in parts if p) or "default"

    def load_heads(self, h: int) -> int:
        """Heads per row the kernel's A loads read at ``h`` heads."""
        return padded_heads(h, self.a_pad) if self.padded_loads else h

    def config(self, decode_config):
        """The :class:`tpa.ops.decode.DecodeConfig` override (class passed in), or None."""
        if self.block_h is None and self.num_warps is None:
            return None
        return decode_config(block_h=self.block_h, num_warps=self.num_warps)

    def options(self, launch):
        """``launch`` (the run's :class:`tpa.ops.decode.DecodeLaunchOptions`) with this variant's padding
        and grid order."""
        if not (self.padded_loads or self.heads_inner):
            return launch
        return dataclasses.replace(launch, a_head_pad=self.a_pad if self.padded_loads else 1,
                                   heads_inner=self.heads_inner)


def padded_heads(h: int, pad: int) -> int:
    return -(-h // pad) * pad


def variants_from_args(args) -> list[Variant]:
    """Every combination of ``args.block_h``, ``args.num_warps``, ``args.pad_a_heads`` (0 or 1: the
    heuristic's, the unpadded layout) and ``args.head_order``, with ``args.pad_loads`` for the padded
    ones, in that order."""
    loads = {"padded": (True,), "h": (False,), "both": (True, False)}[getattr(args, "pad_loads", "padded")]
    orders = {"split": (False,), "heads": (True,), "both": (False, True)}[getattr(args, "head_order", "split")]
    out = []
    for bh, warps, pad in itertools.product(getattr(args, "block_h", [0]), getattr(args, "num_warps", [0]),
                                            getattr(args, "pad_a_heads", [1])):
        for padded, inner in itertools.product(loads if pad > 1 else (False,), orders):
            v = Variant(bh or None, warps or None, max(pad, 1), padded, inner)
            if v not in out:
                out.append(v)
    return out


def applies(variant: Variant, h: int) -> bool:
    """Whether the variant is one of its own at ``h`` heads: a pad that ``h`` is a multiple of adds no
    head, and the grid order matters only with several head blocks (a ``block_h`` below ``h``)."""
    if variant.heads_inner and not (variant.block_h and variant.block_h < h):
        return False
    return variant.a_pad == 1 or padded_heads(h, variant.a_pad) != h


def check_args(args) -> None:
    """Reject variant values no launch can take, before any GPU work."""
    for name in ("block_h", "num_warps"):
        for v in getattr(args, name, [0]):
            if v < 0 or (v and v & (v - 1)):
                raise SystemExit(f"tpa bench decode: --{name.replace('_', '-')} takes powers of two (0: the "
                                 f"heuristic's), got {v}")
    for v in getattr(args, "pad_a_heads", [1]):
        if v < 1:
            raise SystemExit(f"tpa bench decode: --pad-a-heads takes multiples >= 1, got {v}")
