"""`tpa ablate --seeds`: several seeds per type, mean ± std, resuming, and merging split ablations."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from tpa.cli import main

pytest.importorskip("matplotlib")

TYPES = ["mha", "tpa"]


def ablate_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", "--data", str(data), "--preset", "tiny", "--types", *TYPES, "--steps", "4", "--batch-size",
            "4", "--seq-len", "16", "--eval-every", "2", "--eval-sequences", "4", "--data-seed", "3",
            "--device", "cpu", "--output", str(out), *extra]


def read(out: Path) -> dict:
    return json.loads((out / "ablation.json").read_text())


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``text``, as lists of cells."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("| "):
            started = True
            if not line.startswith(("| attention", "| :")):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        elif started:
            break
    return rows


def finals(record: dict) -> dict:
    return {(r["attention_type"], r["seed"]): r["final_val_loss"] for r in record["runs"]}


@pytest.fixture(scope="module")
def two_seeds(corpus, tmp_path_factory):
    """Two seeds x two types in one call: ``(output folder, data folder)``."""
    out = tmp_path_factory.mktemp("seeds") / "both"
    assert main(ablate_args(corpus[1], out, "--seeds", "0", "1")) == 0
    return out, corpus[1]


def test_two_seeds_table_json_csv_and_plot(two_seeds):
    out, _ = two_seeds
    record = read(out)
    assert record["seeds"] == [0, 1] and record["rows"] == TYPES and record["complete"]
    assert len(record["runs"]) == 4
    # seed s: initialisation seed s, data order --data-seed + s; within a seed every type alike
    for r in record["runs"]:
        assert (r["train_config"]["seed"], r["train_config"]["data_seed"], r["data_seed"]) == (
            r["seed"], 3 + r["seed"], 3 + r["seed"])
        assert (out / "runs" / f"seed{r['seed']}" / r["attention_type"] / "metrics.jsonl").is_file()
    loss = finals(record)
    assert all(loss[(t, 0)] != loss[(t, 1)] for t in TYPES)  # the seeds are different runs

    text = (out / "ablation.md").read_text()
    rows = table_rows(text)
    assert [row[0] for row in rows] == ["MHA", "TPA"]  # one row per type
    assert "final val loss (mean ± std)" in text and "best val loss (mean)" in text
    for t, row in zip(TYPES, rows):
        runs = [r for r in record["runs"] if r["attention_type"] == t]
        values = [r["final_val_loss"] for r in runs]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        summary = record["results"][t]
        assert summary["final_val_loss"] == pytest.approx(mean, abs=1e-12)
        assert summary["final_val_loss_std"] == pytest.approx(std, abs=1e-12)
        assert summary["final_val_losses"] == values and summary["seeds"] == [0, 1] and summary["n_seeds"] == 2
        assert summary["val_perplexity"] == pytest.approx(math.exp(mean))
        bests = [min(c["val_loss"] for c in r["curve"] if c["val_loss"] is not None) for r in runs]
        assert summary["best_val_loss"] == pytest.approx(statistics.fmean(bests))
        assert summary["tokens_per_s"] == pytest.approx(statistics.fmean(r["tokens_per_s"] for r in runs))
        assert row[5] == "2" and row[6] == f"{mean:.4f} ± {std:.4f}" and row[7] == f"{math.exp(mean):.2f}"
        # the mean curve with its min-max band
        last = summary["curve"][-1]
        assert last["val_loss"] == pytest.approx(mean)
        assert (last["val_loss_min"], last["val_loss_max"]) == (min(values), max(values))
        # the second table: every seed's final loss
        assert f"| {row[0]} | {values[0]:.4f} | {values[1]:.4f} |" in text

    with open(out / "ablation.csv") as f:
        summary_rows = list(csv.DictReader(f))
    assert [r["attention_type"] for r in summary_rows] == TYPES
    assert all(r["n_seeds"] == "2" and r["seeds"] == "0 1" and float(r["final_val_loss_std"]) > 0
               for r in summary_rows)
    with open(out / "seeds.csv") as f:
        seed_rows = list(csv.DictReader(f))
    assert [(r["attention_type"], r["seed"], r["data_seed"]) for r in seed_rows] == [
        ("mha", "0", "3"), ("mha", "1", "4"), ("tpa", "0", "3"), ("tpa", "1", "4")]
    assert all(float(r["final_val_loss"]) == loss[(r["attention_type"], int(r["seed"]))] for r in seed_rows)
    with open(out / "curves.csv") as f:
        assert {(r["attention_type"], r["seed"]) for r in csv.DictReader(f)} == {(t, s) for t in TYPES for s in "01"}
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # --replot redraws the same table from ablation.json alone
    (out / "loss.png").unlink()
    assert main(["ablate", "--replot", str(out)]) == 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "ablation.md").read_text() == text


def test_split_by_seeds_then_merge_and_resume(two_seeds, tmp_path, capsys):
    """An ablation split over two calls (one seed each) merges into the one-call result; --resume
    into the first call's folder trains only the missing seed and arrives at the same record."""
    both, data = two_seeds
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert main(ablate_args(data, a, "--seeds", "0", "--no-plot")) == 0
    assert main(ablate_args(data, b, "--seed", "1", "--no-plot")) == 0
    assert read(a)["seeds"] == [0] and read(b)["seeds"] == [1]
    capsys.readouterr()

    assert main(["ablate", "--replot", str(a), str(b), "--output", str(merged)]) == 0
    record, reference = read(merged), read(both)
    assert record["seeds"] == [0, 1] and record["rows"] == TYPES and record["complete"]
    assert [s["folder"] for s in record["sources"]] == [str(a), str(b)]
    assert finals(record) == pytest.approx(finals(reference), rel=1e-5)
    assert len(table_rows((merged / "ablation.md").read_text())) == 2
    assert (merged / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["ablate", "--replot", str(merged)]) == 0  # the merged folder redraws on its own

    # the same ablation by resuming the first call's folder with both seeds
    capsys.readouterr()
    assert main(ablate_args(data, a, "--seeds", "0", "1", "--resume", "--no-plot")) == 0
    printed = capsys.readouterr().out
    assert "mha seed 0: finished earlier, kept" in printed and "tpa seed 0: finished earlier, kept" in printed
    assert "mha seed 1: val loss" in printed
    assert finals(read(a)) == pytest.approx(finals(reference), rel=1e-5)
    assert read(a)["complete"] and len(table_rows((a / "ablation.md").read_text())) == 2


def test_merge_and_resume_refuse_what_does_not_fit(two_seeds, tmp_path, capsys):
    both, data = two_seeds
    # the same (type, seed) in two folders
    assert main(["ablate", "--replot", str(both), str(both), "--output", str(tmp_path / "m")]) == 2
    assert "one folder twice" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(ablate_args(data, other, "--seeds", "1", "--types", "mha", "--no-plot")) == 0
    assert main(["ablate", "--replot", str(both), str(other), "--output", str(tmp_path / "m")]) == 2
    assert "mha seed 1 is in both" in capsys.readouterr().err
    # different settings
    short = tmp_path / "short"
    assert main(ablate_args(data, short, "--seeds", "5", "--steps", "2", "--no-plot")) == 0
    assert main(["ablate", "--replot", str(both), str(short), "--output", str(tmp_path / "m")]) == 2
    assert "different settings (steps 4 vs 2)" in capsys.readouterr().err
    assert main(ablate_args(data, short, "--seeds", "6", "--resume", "--no-plot")) == 2
    assert "other settings (steps 2 vs 4" in capsys.readouterr().err
    # several folders need --output; an existing ablation there is not replaced unasked
    assert main(["ablate", "--replot", str(both), str(short)]) == 2
    assert "give --output" in capsys.readouterr().err
    assert main(["ablate", "--replot", str(short), "--output", str(both), "--no-plot"]) == 2
    assert "already holds an ablation" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0", "1", "0"], "lists seed 0 twice"),
    (["--seeds", "-1"], "seeds must be >= 0, got -1"),
    (["--seeds", "1,x"], "'x' is not an integer"),
    (["--seed", "1", "--seeds", "1", "2"], "give --seed or --seeds, not both"),
    (["--seed", "-2"], "seeds must be >= 0, got -2"),
    (["--data-seed", "-1"], "--data-seed must be >= 0"),
])
def test_bad_seed_arguments(corpus, tmp_path, capsys, extra, message):
    assert main(ablate_args(corpus[1], tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_and_overwrite_exclude_each_other(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(ablate_args(corpus[1], tmp_path / "out", "--resume", "--overwrite"))
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_replot_of_a_one_seed_record_from_before_seeds(tmp_path):
    """ablation.json files written before --seeds (BENCHMARKS.md's) redraw to the table they came with."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "ablate-h100-2026-11-22"
    if not (folder / "ablation.json").is_file():
        pytest.skip("benchmarks/ablate-h100-2026-11-22 is not in this checkout")
    assert "runs" not in json.loads((folder / "ablation.json").read_text())
    assert main(["ablate", "--replot", str(folder), "--output", str(tmp_path), "--no-plot"]) == 0
    assert (tmp_path / "ablation.md").read_text() == (folder / "ablation.md").read_text()
    record = read(tmp_path)
    assert record["version"] == 3 and record["seeds"] == [0] and len(record["runs"]) == 6


def test_replot_of_a_version_2_record(tmp_path):
    """Records of one row per attention type (version 2, before rows) redraw to the table they came with."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "ablate-seeds-h100-2026-11-23"
    if not (folder / "ablation.json").is_file():
        pytest.skip("benchmarks/ablate-seeds-h100-2026-11-23 is not in this checkout")
    assert json.loads((folder / "ablation.json").read_text())["version"] == 2
    assert main(["ablate", "--replot", str(folder), "--output", str(tmp_path), "--no-plot"]) == 0
    assert (tmp_path / "ablation.md").read_text() == (folder / "ablation.md").read_text()
    record = read(tmp_path)
    assert record["version"] == 3 and record["rows"] == ["mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa"]
    assert len(record["runs"]) == 42 and all(r["row"] == r["attention_type"] for r in record["runs"])
