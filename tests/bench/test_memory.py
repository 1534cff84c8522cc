"""`tpa bench memory`: the library's accounting equals the paper's Table 1 for every preset and type."""

from __future__ import annotations

import json

import pytest

from tpa.cli import main
from tpa.utils.args import UsageError, parse_bytes
from tpa.models.presets import ATTENTION_TYPES, PRESETS

# Table 10 of the paper: heads per attention type
TABLE10 = {"small": {"mha": 12, "mqa": 23, "gqa": 22, "mla": 12, "tpa_kvonly": 22, "tpa": 34},
           "medium": {"mha": 16, "mqa": 31, "gqa": 30, "mla": 23, "tpa_kvonly": 29, "tpa": 47},
           "large": {"mha": 20, "mqa": 39, "gqa": 38, "mla": 34, "tpa_kvonly": 37, "tpa": 61},
           "xl": {"mha": 25, "mqa": 49, "gqa": 48, "mla": 49, "tpa_kvonly": 47, "tpa": 78}}


def table1(t: str, d: int, h: int, dh: int, c: dict) -> tuple[int, int]:
    """(KV cache per token per layer, attention parameters) written out from the paper's Table 1."""
    rq, rk, rv, g, dc, dcq, dr = c["q_rank"], c["k_rank"], c["v_rank"], c["num_key_value_heads"], \
        c["kv_lora_rank"], c["q_lora_rank"], c["qk_rope_head_dim"]
    return {
        "mha": (2 * h * dh, 4 * d * h * dh),
        "mqa": (2 * dh, 2 * d * dh * (h + 1)),
        "gqa": (2 * g * dh, 2 * d * dh * (h + g)),
        "mla": (dc + dr, dcq * (d + h * dh + h * dr) + dc * (d + 2 * h * dh) + d * (h * dh + dr)),
        "tpa": ((rk + rv) * (h + dh), d * (rq + rk + rv) * (h + dh) + d * h * dh),
        "tpa_kvonly": ((rk + rv) * (h + dh), d * (rk + rv) * (h + dh) + 2 * d * h * dh),
    }[t]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    assert main(["bench", "memory", "--memory", "80GB", "--batch", "1", "--measure", "off",
                 "--output", str(out)]) == 0
    for name in ("memory.json", "memory.csv", "memory.md"):
        assert (out / name).is_file()
    return json.loads((out / "memory.json").read_text())


def test_every_preset_and_type_equals_table1(record):
    rows = {(r["preset"], r["attention_type"]): r for r in record["rows"]}
    assert set(rows) == {(p, t) for p in PRESETS for t in ATTENTION_TYPES}
    for (preset, t), r in rows.items():
        kv, params = table1(t, r["d_model"], r["heads"], r["head_dim"], r["config"])
        assert r["kv_elements_per_token_layer"] == kv, (preset, t)
        assert r["attention_params_per_layer"] == params, (preset, t)
        assert r["kv_bytes_per_token_layer"] == 2 * kv  # bf16
        assert r["kv_elements_per_token"] == kv * r["layers"] and r["kv_bytes_per_token"] == 2 * kv * r["layers"]
        assert r["weight_bytes"] == 2 * r["parameters"]
        assert r["max_context"] == (80 * 10**9 - r["weight_bytes"]) // (2 * kv * r["layers"])
        if preset in TABLE10:
            assert r["heads"] == TABLE10[preset][t] and r["head_dim"] == 64
    # the paper's Table 1 setting: R_K = R_V = 2, d_h = 64 -> TPA small caches 4 (34 + 64) numbers per layer
    assert rows[("small", "tpa")]["kv_elements_per_token_layer"] == 392
    assert rows[("small", "mha")]["kv_elements_per_token_layer"] == 2 * 12 * 64
    assert rows[("small", "mha")]["parameters"] == 123_587_328  # GPT-2 small's 124M with tied embeddings


def test_measured_cache_matches_the_accounting(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["bench", "memory", "--presets", "tiny", "--types", "all", "--measure", "on",
                 "--measure-tokens", "40", "--batch", "2", "--dtype", "fp32", "--device", "cpu",
                 "--output", str(out)]) == 0
    measured = json.loads((out / "memory.json").read_text())["measured"]
    assert [m["attention_type"] for m in measured] == list(ATTENTION_TYPES)
    for m in measured:
        assert m["matches"] and m["cache_tensor_bytes"] == m["predicted_bytes"] > 0
        assert m["measured_elements_per_token_layer"] == m["predicted_elements_per_token_layer"]
    assert (out / "measured.csv").is_file()
    assert "| yes |" in (out / "memory.md").read_text()


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    assert main(["bench", "memory", "--memory", "100MB", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is smaller than the weights of" in err and "small/tpa" in err
    assert main(["bench", "memory", "--presets", "huge", "--output", str(tmp_path)]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["bench", "memory", "--types", "linear", "--output", str(tmp_path)]) == 2
    assert "unknown attention type 'linear'" in capsys.readouterr().err
    assert main(["bench", "memory", "--memory", "eighty", "--output", str(tmp_path)]) == 2
    assert "memory size" in capsys.readouterr().err
    assert not (tmp_path / "memory.json").exists()


def test_parse_bytes_units():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1e9") == 10**9 and parse_bytes("4096") == 4096
    for bad in ("0GB", "-1GB", "12 parsecs", ""):
        with pytest.raises(UsageError):
            parse_bytes(bad)
