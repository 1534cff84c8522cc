"""``tpa bench decode``: the FlashTPA decoding kernel against the reference twin and PyTorch SDPA.

One run, on one CUDA GPU (the kernel's correctness on the GPU is tested by
``python -m pytest -m gpu tests/ops``, not here):

1. measures the device-to-device copy bandwidth (bytes read + written, the ceiling for a
   memory-bound kernel);
2. sweeps the paper's Figure 5 grid: batch {1, 2, 4, 8, 16} x d_model {1024, 2048, 3072} (d_h = 64)
   x cache length 2^12 .. 2^19 x TPA ranks (16, 1, 1) and (6, 2, 2), skipping what does not fit,
   timing with CUDA events and the L2 cache flushed before every call: this kernel, the reference
   twin (small points), SDPA decoding over materialised K/V caches for MHA, GQA with 4 KV heads
   and MQA at the same H and d_h, and MLA's absorbed decode (``tpa.layers.mla.latent_attention``, as
   the T6 MLA layer decodes) over a latent cache of d_c = 256 and d_R = 32 per token. For the kernel
   and the baselines each point has three
   figures: ``us`` (plain launches, GPU time), ``host_us`` (host time of one eager call: 300 calls
   back to back, no sync in the timed span) and ``graph_us`` (the call replayed from a CUDA graph,
   GPU time);
3. times batch 1 / length 4096 with plain launches and with CUDA-graph replay;
4. times consecutive decode steps with the cache length growing by one per step.

It writes ``decode.csv``, ``decode_dmodel{D}.png`` (log2 time against log2 length, one panel per
batch, like the paper's Figure 5), ``latency.json``, ``growing.csv`` and ``summary.txt`` under
``--output``, and prints per point microseconds, GB/s and the fraction of the copy bandwidth.
With ``--tune`` it first chooses the launch heuristic's constants by measurement (see ``tune``).
Restrict the grid with ``--batch``, ``--d-model``, ``--min-len``/``--max-len`` (or ``--lengths``),
``--ranks`` and ``--baselines`` so that a run fits a time budget; ``--grid-only`` skips phases 3 and 4.
With ``--block-h``, ``--num-warps``, ``--pad-a-heads`` and ``--head-order`` each TPA point is timed
per launch variant, one ``decode.csv`` row each (``tpa.bench.decode.variants``: head blocks, warps,
A caches padded to a multiple of M heads, grid order; host time and the reference twin only for the
default variant).
"""

from __future__ import annotations


def main(args) -> int:
    from tpa.bench.decode.run import main as run_main

    return run_main(args)
