"""`tpa bench convert` at a tiny size: teacher, conversions, distillation, runs from scratch, table, plot."""

from __future__ import annotations

import json

import pytest

from tpa.cli import main

pytest.importorskip("matplotlib")


def test_bench_convert_writes_every_point_table_and_plot(corpus, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "convert", "--data", str(corpus[1]), "--preset", "tiny", "--ranks", "1,2", "--teacher-steps", "10",
            "--distill-fraction", "0.2", "--batch-size", "4", "--seq-len", "16", "--eval-sequences", "4",
            "--calibration-tokens", "512", "--device", "cpu", "--output", str(out)]
    assert main(args) == 0
    record = json.loads((out / "convert.json").read_text())
    models = [(r["model"], r["rank"]) for r in record["results"]]
    assert models == [("teacher (MHA)", None)] + [
        (name, rank) for rank in (1, 2) for name in
        ("converted", "converted + distilled", "TPA-KVonly from scratch, distillation's tokens",
         "TPA-KVonly from scratch, teacher's tokens")]
    heads, dim = 4, 32  # the tiny MHA teacher
    by = {(r["model"], r["rank"]): r for r in record["results"]}
    assert by[("teacher (MHA)", None)]["kv_elements_per_token_per_layer"] == 2 * heads * dim
    for rank in (1, 2):
        caches = {r["kv_elements_per_token_per_layer"] for r in record["results"] if r["rank"] == rank}
        assert caches == {2 * rank * (heads + dim)}  # Table 1 for every model of that rank
        assert by[("converted + distilled", rank)]["train_tokens"] == 2 * 4 * 16
        assert by[("TPA-KVonly from scratch, distillation's tokens", rank)]["train_tokens"] == 2 * 4 * 16
        assert by[("TPA-KVonly from scratch, teacher's tokens", rank)]["train_tokens"] == 10 * 4 * 16
        assert by[("converted", rank)]["val_loss"] > 0
    assert record["conversions"]["1"]["layers"][0]["parts"]["k"]["method"] in ("svd", "als")
    assert record["run"]["date"] and record["run"]["device_name"]
    png = (out / "convert.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "convert.md").read_text()
    assert table in capsys.readouterr().out and "converted + distilled" in table
    # a second call does not overwrite the result unless asked
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
