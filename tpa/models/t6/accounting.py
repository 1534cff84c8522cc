"""Table 1 of the paper computed by the library: KV-cache size per token for every preset and type."""

from __future__ import annotations

from tpa.models.t6.configuration_t6 import ATTENTION_TYPES, T6Config

PAPER_PRESETS = ("small", "medium", "large", "xl")


def kv_cache_table_markdown(presets=PAPER_PRESETS, attention_types=ATTENTION_TYPES) -> str:
    """Markdown table: cached elements per token per layer (heads in brackets), per preset and type."""
    header = "| preset | " + " | ".join(attention_types) + " |"
    lines = [header, "|" + "---|" * (len(attention_types) + 1)]
    for preset in presets:
        cells = []
        for t in attention_types:
            cfg = T6Config.from_preset(preset, t)
            cells.append(f"{cfg.kv_cache_elements_per_token()} (h={cfg.num_attention_heads})")
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(kv_cache_table_markdown())
