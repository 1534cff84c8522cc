"""`tpa demo` (what `bash scripts/demo.sh` runs after setup), on a small local corpus and few steps."""

from __future__ import annotations

import re

from data.corpus import write_txt_corpus


def test_demo_compares_tpa_and_mha(tmp_path, monkeypatch, capsys):
    from tpa import T6Config
    from tpa.cli import main
    from tpa.train.demo import model_summary

    write_txt_corpus(tmp_path / "src", 30, seed=0, sentences=60)
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--source", str(tmp_path / "src"), "--data-dir", "data", "--runs", "runs", "--steps", "3",
            "--vocab-size", "300", "--max-new-tokens", "5", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups() for m in re.finditer(
        r"^\s*(TPA|MHA)\s+([\d,]+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d,]+)\s+([\d,]+)\s+\d+\s*$", out, re.M)}
    assert set(rows) == {"TPA", "MHA"}, out
    for name, attention in (("TPA", "tpa"), ("MHA", "mha")):
        config = T6Config.from_preset("tiny", attention)
        summary = model_summary(tmp_path / "runs" / attention / "final")
        # the bytes read off the cache are Table 1's elements x layers x 2 bytes (bf16)
        assert summary["cache_elements"] == config.kv_cache_elements_per_token() * config.num_hidden_layers
        assert summary["cache_bytes"] == 2 * summary["cache_elements"]
        assert rows[name][6] == f"{summary['cache_bytes']:,}" and rows[name][3] == "3"
    params = {k: int(v[1].replace(",", "")) for k, v in rows.items()}
    assert abs(params["TPA"] - params["MHA"]) / params["MHA"] < 0.02  # the same parameter count, to 2%
    assert int(rows["TPA"][6].replace(",", "")) < int(rows["MHA"][6].replace(",", ""))
    assert "sample from the T6 (TPA) model" in out
    # a second run reuses the prepared data and the finished runs
    assert main(args) == 0
    assert "already prepared" in capsys.readouterr().out
