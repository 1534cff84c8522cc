"""Choosing the decode kernel's launch configuration by measurement: ``--sweep`` times explicit
configurations at fixed points, ``--tune`` picks the launch heuristic's constants."""

from __future__ import annotations

import csv
import math
import os

from tpa.bench.decode.inputs import tpa_bytes, tpa_inputs


SWEEP_POINTS = [  # (batch, length, ranks), H=32, d_h=64: the targets' points and the outlier
    (1, 4096, (16, 1, 1)), (1, 16384, (16, 1, 1)), (1, 1 << 19, (16, 1, 1)),
    (2, 1 << 19, (16, 1, 1)), (4, 1 << 18, (16, 1, 1)), (8, 1 << 17, (16, 1, 1)), (16, 1 << 16, (16, 1, 1)),
    (4, 4096, (6, 2, 2)), (16, 4096, (16, 1, 1)),
]


def sweep(torch, timer, decode_mod, dtype, elt, bw, out_dir, log):
    """Time explicit launch configurations at SWEEP_POINTS (coordinate descent): first the split
    count (block 64, 3 stages, default warps), then stages x block x warps at the best split count,
    then the best without programmatic dependent launch of the merge kernel. Writes sweep.csv; the
    heuristic (``decode.DecodeHeuristic`` and ``default_config``) is then set from it by hand, and the
    grid re-run checks the result."""
    from tpa.ops.decode import DecodeConfig, DecodeLaunchOptions, default_config, tpa_decode

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows_out = []

    def run(inputs, out, cfg, options=None):
        try:
            return timer.time(lambda: tpa_decode(*inputs[:7], out=out, config=cfg, options=options), reps=15,
                              budget_s=0.05)
        except Exception as err:  # noqa: BLE001  # a configuration that does not compile or launch
            log(f"    {cfg} failed: {type(err).__name__}: {str(err)[:100]}")
            return float("inf")

    for bsz, length, ranks in SWEEP_POINTS:
        inputs = tpa_inputs(torch, bsz, length, 32, 64, ranks, dtype)
        out = torch.empty(bsz, 1, 32, 64, dtype=dtype, device="cuda")
        nbytes = tpa_bytes(bsz, length, 32, 64, ranks, elt)
        default = default_config(bsz, 1, 32, 64, 64, length, sms, elt, None, ranks[1], ranks[2])
        base_us = run(inputs, out, None)
        results = {}
        splits = sorted({s for s in [1, 4, 8, 16, 24, 32, 48, 64, 128, 256]
                         + [round(k * sms / bsz) for k in (1, 2, 3, 4, 6, 8)]
                         if 1 <= s <= min(256, length // 64)})
        for sp in splits:
            cfg = DecodeConfig(block_m=64, num_stages=3, num_splits=sp)
            results[cfg] = run(inputs, out, cfg)
        best = min(results, key=results.get)
        for stages in (2, 3, 4):
            for bm in (64, 128):
                for warps in (None, 4, 8):
                    cfg = DecodeConfig(block_m=bm, num_stages=stages, num_splits=best.num_splits, num_warps=warps)
                    if cfg not in results:
                        results[cfg] = run(inputs, out, cfg)
        ranked = sorted(results.items(), key=lambda kv: kv[1])
        top = ranked[0][0]
        no_pdl = run(inputs, out, top, DecodeLaunchOptions(use_pdl=False))
        rows_out.append(dict(batch=bsz, length=length, ranks=",".join(map(str, ranks)), splits=top.num_splits,
                             block_m=top.block_m, stages=top.num_stages, warps=f"{top.num_warps} no-PDL", us=no_pdl,
                             frac_copy=nbytes / (bw * 1e9) * 1e6 / no_pdl))
        ideal = nbytes / (bw * 1e9) * 1e6
        log(f"  B={bsz} L={length} R={ranks}: default {default} {base_us:.1f} us ({ideal / base_us:.1%} of copy); "
            f"best without PDL {no_pdl:.1f} us; best:")
        for cfg, us in ranked[:6]:
            log(f"    {us:8.1f} us ({ideal / us:6.1%})  splits={cfg.num_splits} "
                f"bm={cfg.block_m} stages={cfg.num_stages} warps={cfg.num_warps}")
        for cfg, us in results.items():
            rows_out.append(dict(batch=bsz, length=length, ranks=",".join(map(str, ranks)), splits=cfg.num_splits,
                                 block_m=cfg.block_m, stages=cfg.num_stages,
                                 warps=cfg.num_warps, us=us, frac_copy=ideal / us))
        rows_out.append(dict(batch=bsz, length=length, ranks=",".join(map(str, ranks)), splits=default.num_splits,
                             block_m=default.block_m, stages=default.num_stages,
                             warps="default", us=base_us, frac_copy=ideal / base_us))
        inputs = out = None
        torch.cuda.empty_cache()
    path = os.path.join(out_dir, "sweep.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        w.writeheader()
        w.writerows(rows_out)
    log(f"wrote {path}")


TUNE_CANDIDATES = [
    {"warps": w, "block_m": bm, "num_stages": 3, **split_rule}
    for w in ("fixed", "rows") for bm in (32, 64)
    for split_rule in ({"splits": "waves"}, *({"splits": "programs", "programs_per_sm": p} for p in (2, 4, 8)))
]


def tune(torch, timer, tpa_decode, decode_mod, dtype, elt, bw, log):
    """Choose the launch heuristic's constants (a ``decode.DecodeHeuristic``) by measurement: each
    candidate rule is timed through the default path at a few H=32 points; the best geometric mean
    over the (16, 1, 1) points wins and is used for the rest of the run. Returns the winner."""
    import dataclasses
    import statistics as st

    points = [(1, 4096, (16, 1, 1)), (1, 1 << 19, (16, 1, 1)), (4, 1 << 17, (16, 1, 1)),
              (16, 1 << 16, (16, 1, 1)), (16, 1 << 18, (16, 1, 1)), (16, 1 << 18, (6, 2, 2))]
    original = decode_mod.DecodeHeuristic()
    table = {i: [] for i in range(len(TUNE_CANDIDATES))}
    for bsz, length, ranks in points:
        inputs = tpa_inputs(torch, bsz, length, 32, 64, ranks, dtype)
        out = torch.empty(bsz, 1, 32, 64, dtype=dtype, device="cuda")
        for i, cand in enumerate(TUNE_CANDIDATES):
            # constants a candidate leaves out keep their values
            options = decode_mod.DecodeLaunchOptions(heuristic=dataclasses.replace(original, **cand))
            try:
                us = timer.time(lambda: tpa_decode(*inputs[:7], out=out, options=options), reps=10, budget_s=0.05)
            except Exception as err:  # noqa: BLE001  # a candidate that does not compile or launch
                log(f"  candidate {cand} failed at B={bsz} L={length}: {type(err).__name__}: {str(err)[:120]}")
                us = float("inf")
            table[i].append(us)
        inputs = out = None
        torch.cuda.empty_cache()
    log("tune: GPU us per point " + ", ".join(f"B={b} L={n} R={''.join(map(str, r))}" for b, n, r in points))
    scores = {}
    for i, cand in enumerate(TUNE_CANDIDATES):
        times = table[i]
        scores[i] = st.geometric_mean(times[:5]) if all(math.isfinite(t) for t in times[:5]) else float("inf")
        log(f"  {cand}: " + " ".join(f"{t:8.1f}" for t in times) + f"   geomean(16,1,1) {scores[i]:.1f}")
    best = min(scores, key=scores.get)
    winner = dataclasses.replace(original, **TUNE_CANDIDATES[best])
    log(f"tune: winner {winner} (code default was {original})")
    return winner
