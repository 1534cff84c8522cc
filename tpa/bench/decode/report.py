"""The decode benchmark's figures (Figure 5 of the paper) and its summary against the targets."""

from __future__ import annotations

import math
import os


def plot(rows, out_dir, log):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"tpa": ("TPA", "-"), "reference": ("TPA reference twin", ":"), "sdpa_mha": ("SDPA MHA", "--"),
              "sdpa_gqa4": ("SDPA GQA-4", "--"), "sdpa_mqa": ("SDPA MQA", "--"),
              "mla_absorbed": ("MLA absorbed (d_c 256, d_R 32)", "-.")}
    for d_model in sorted({r["d_model"] for r in rows}):
        sub = [r for r in rows if r["d_model"] == d_model]
        batches = sorted({r["batch"] for r in sub})
        fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), squeeze=False)
        for ax, bsz in zip(axes[0], batches):
            series = {}
            for r in sub:
                if r["batch"] != bsz:
                    continue
                key = (r["method"], r.get("ranks", ""), r.get("variant") or "default")
                series.setdefault(key, []).append((math.log2(r["length"]), math.log2(r["us"] * 1e-6)))
            for (method, ranks, variant), pts in sorted(series.items()):
                pts.sort()
                label, ls = styles.get(method, (method, "-"))
                if ranks:
                    label += f" ({ranks})"
                if variant != "default":
                    label += f" {variant}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3, label=label)
            ax.set_title(f"Batch Size: {bsz}, Embedding Dim: {d_model}", fontsize=9)
            ax.set_xlabel("log2(sequence length)")
            ax.set_ylabel("log2(time) (seconds)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"decode_dmodel{d_model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        log(f"wrote {path}")


def summarize(rows, bw, latency, growing, log):
    """The issue's targets, evaluated on this run's numbers (H=32, d_h=64 where stated)."""
    log("targets (H=32, d_h=64, this dtype; the default launch variant):")
    tpa = {(r["batch"], r["length"], r["heads"], r["ranks"]): r for r in rows
           if r["method"] == "tpa" and r.get("variant", "default") == "default"}
    sdpa = {(r["method"], r["batch"], r["length"], r["heads"]): r for r in rows if r["method"].startswith("sdpa")}
    big = [r for k, r in tpa.items() if k[2] == 32 and k[3] == "16,1,1" and r["bytes"] >= 256e6]
    if big:
        worst = min(big, key=lambda r: r["frac_copy"])
        log(f"  (16,1,1) reads >= 256 MB: min fraction of copy bandwidth {worst['frac_copy']:.1%} "
            f"(B={worst['batch']} L={worst['length']}); target >= 90%: "
            f"{'met' if worst['frac_copy'] >= 0.9 else 'NOT met'} over {len(big)} points")
    if latency:
        log(f"  batch 1 length 4096: graph replay {latency['graph_gpu_flushed_us']:.2f} us (GPU, flushed), plain "
            f"launches {latency['plain_gpu_flushed_us']:.2f} us (GPU, flushed), host per plain call "
            f"{latency['plain_host_per_call_us']:.2f} us; target <= 10 us")
        if "graph_rotating_per_call_us" in latency:
            log(f"  batch 1 length 4096, one graph of {latency['graph_rotating_caches']} calls over as many caches "
                f"(4x the L2): {latency['graph_rotating_per_call_us']:.2f} us per call; target <= 10 us")
    slower_gqa, ratio_mqa = [], []
    for (b, length, h, ranks), r in tpa.items():
        if h != 32 or ranks != "16,1,1":
            continue
        g = sdpa.get(("sdpa_gqa4", b, length, h))
        m = sdpa.get(("sdpa_mqa", b, length, h))
        if g and length >= 16384 and r["us"] >= g["us"]:
            slower_gqa.append((b, length, round(r["us"], 1), round(g["us"], 1)))
        if m:
            ratio_mqa.append((r["us"] / m["us"], b, length))
    log(f"  faster than SDPA GQA-4 at every length >= 16K: {'met' if not slower_gqa else 'NOT met at ' + str(slower_gqa)}")
    if ratio_mqa:
        worst = max(ratio_mqa)
        log(f"  TPA / SDPA MQA time, worst {worst[0]:.2f}x at B={worst[1]} L={worst[2]}; target <= 1.6x: "
            f"{'met' if worst[0] <= 1.6 else 'NOT met'}")
    r622 = [r for k, r in tpa.items() if k[2] == 32 and k[3] == "6,2,2"]
    if r622:
        top = max(r622, key=lambda r: r["bytes"])
        log(f"  (6,2,2) largest point B={top['batch']} L={top['length']}: {top['frac_copy']:.1%} of copy; "
            f"target >= 80%: {'met' if top['frac_copy'] >= 0.8 else 'NOT met'}")
    if growing:
        log(f"  growing length: max/median plain {growing['plain_max_over_median']:.2f}, graph "
            f"{growing['graph_max_over_median']:.2f}; target <= 2: "
            f"{'met' if max(growing['plain_max_over_median'], growing['graph_max_over_median']) <= 2 else 'NOT met'}")
