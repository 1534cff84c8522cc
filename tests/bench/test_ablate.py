"""`tpa ablate` at a tiny size: one run per attention type on the same data, a plot and a table."""

from __future__ import annotations

import csv
import json

import pytest

from tpa.cli import main

pytest.importorskip("matplotlib")

LABELS = ["MHA", "MQA", "GQA", "MLA", "TPA-KVonly", "TPA"]


def test_ablation_writes_plot_and_one_row_per_type(corpus, tmp_path, capsys):
    out = tmp_path / "ablate"
    args = ["ablate", "--data", str(corpus[1]), "--preset", "tiny", "--steps", "4", "--batch-size", "4",
            "--seq-len", "16", "--eval-every", "2", "--eval-sequences", "4", "--device", "cpu", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "ablation.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| attention")
            and not line.startswith("| :")]
    assert [line.split("|")[1].strip() for line in body] == LABELS
    record = json.loads((out / "ablation.json").read_text())
    assert record["rows"] == ["mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa"]
    for r in record["results"].values():
        # the same token budget, the same logged steps, a validation loss at 0, 2 and 4
        assert r["tokens"] == 4 * 4 * 16
        assert [c["step"] for c in r["curve"]] == [0, 1, 2, 3, 4]
        assert [c["step"] for c in r["curve"] if c["val_loss"] is not None] == [0, 2, 4]
        assert r["final_val_loss"] == r["curve"][-1]["val_loss"] and r["val_perplexity"] > 1
        assert r["tokens_per_s"] > 0 and r["kv_bytes_per_token"] == 2 * r["kv_elements_per_token"]
    # every type ran with the same data, data order, seeds, budget and optimizer settings
    shared = ("data_dir", "data_seed", "seed", "seq_len", "global_batch_size", "max_steps", "lr", "min_lr",
              "warmup_steps", "eval_every", "eval_sequences")
    configs = [r["train_config"] for r in record["runs"]]
    assert all({k: c[k] for k in shared} == {k: configs[0][k] for k in shared} for c in configs)
    assert [c["attention_type"] for c in configs] == record["rows"]
    assert configs[0]["seed"] == 0 and configs[0]["data_seed"] == 0 and record["seeds"] == [0]
    assert all((out / "runs" / "seed0" / t / "metrics.jsonl").is_file() for t in record["rows"])
    # one seed: the table of the one-seed ablation, without spread columns
    assert table.splitlines()[2] == ("| attention | params | attn. params / layer | heads | KV cache / token (bf16, "
                                     "all layers) | final val loss | val perplexity | train tokens/s |")
    assert "±" not in table and "seed" not in table
    # at matched parameters TPA caches less per token than MHA
    assert record["results"]["tpa"]["kv_bytes_per_token"] < record["results"]["mha"]["kv_bytes_per_token"]
    assert record["parameter_spread"] < 0.1
    with open(out / "ablation.csv") as f:
        assert [r["attention_type"] for r in csv.DictReader(f)] == record["rows"]
    with open(out / "seeds.csv") as f:
        assert [(r["attention_type"], r["seed"]) for r in csv.DictReader(f)] == [(t, "0") for t in record["rows"]]
    assert f"wrote {out / 'loss.png'}" in printed

    # --replot redraws from ablation.json alone
    (out / "loss.png").unlink()
    assert main(["ablate", "--replot", str(out)]) == 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # a second ablation into the same folder must be asked for
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_ablate_bad_arguments(corpus, tmp_path, capsys):
    assert main(["ablate", "--data", str(corpus[1]), "--preset", "jumbo", "--output", str(tmp_path)]) == 2
    assert "unknown preset 'jumbo'" in capsys.readouterr().err
    assert main(["ablate", "--data", str(tmp_path / "nothing"), "--preset", "tiny", "--output", str(tmp_path)]) == 2
    assert "tpa data prepare" in capsys.readouterr().err
    assert main(["ablate", "--data", str(corpus[1]), "--batch-size", "6", "--micro-batch", "4",
                 "--output", str(tmp_path)]) == 2
    assert "must be >= 1 and divide" in capsys.readouterr().err
    assert main(["ablate", "--replot", str(tmp_path)]) == 2
    assert "no ablation.json" in capsys.readouterr().err
