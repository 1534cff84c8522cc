"""`tpa ablate --row/--rows`: a grid of named overrides x seeds, head counts matched or fixed, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tpa import T6Config
from tpa.bench.ablate_grid import attention_layer_parameters, collect_rows, parse_row, read_rows_file, resolve_row
from tpa.cli import main
from tpa.utils.args import UsageError
from tpa.models.t6.configuration_t6 import attention_parameters, matched_heads

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def resolve(spec: dict, preset: str = "tiny", **kw) -> dict:
    return resolve_row("r", spec, preset, lr=kw.pop("lr", 1e-3), min_lr=kw.pop("min_lr", None))


# --------------------------------------------------------------------------------------------------
# Rows: parsing and resolving (no training)


def test_parse_row_reads_yaml_scalars():
    name, spec = parse_row("tpa_x:attention_type=tpa,k_rank=1,lr=2e-3,tpa_contextual_a=false,"
                           "tpa_head_activation=softmax,match_params=head_dim")
    assert name == "tpa_x"
    assert spec == {"attention_type": "tpa", "k_rank": 1, "lr": 2e-3, "tpa_contextual_a": False,
                    "tpa_head_activation": "softmax", "match_params": "head_dim"}
    assert isinstance(spec["k_rank"], int) and isinstance(spec["lr"], float)


@pytest.mark.parametrize("text, message", [
    ("attention_type=tpa", "expected NAME:key=value"),
    ("x:attention_type", "is not key=value"),
    ("x:k_rank=1,k_rank=2", "k_rank is given twice"),
])
def test_parse_row_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_row(text)


def test_collect_rows_orders_types_files_then_rows_and_rejects_repeats(tmp_path):
    path = tmp_path / "rows.yaml"
    path.write_text("description: two rows\nrows:\n  - {name: f1, attention_type: tpa, k_rank: 1}\n"
                    "  - name: f2\n    attention_type: mha\n")
    assert read_rows_file(path) == [("f1", {"attention_type": "tpa", "k_rank": 1}), ("f2", {"attention_type": "mha"})]
    rows = collect_rows(["mha"], ["c:attention_type=gqa"], [str(path)])
    assert [n for n, _ in rows] == ["mha", "f1", "f2", "c"]
    with pytest.raises(UsageError, match="'f1' is given twice"):
        collect_rows(None, ["f1:attention_type=mha"], [str(path)])
    with pytest.raises(UsageError, match="row name 'a/b'"):
        collect_rows(None, ["a/b:attention_type=mha"], None)
    (tmp_path / "bad.yaml").write_text("rows: {a: 1}\n")
    with pytest.raises(UsageError, match="non-empty list `rows:`"):
        read_rows_file(tmp_path / "bad.yaml")
    with pytest.raises(UsageError, match="cannot read"):
        read_rows_file(tmp_path / "missing.yaml")


def test_match_params_picks_the_heads_the_presets_pick():
    # a row that is its type at the preset keeps the preset's heads (Table 10's at the paper's sizes)
    for preset in ("tiny", "mini", "small"):
        for t in ("mha", "gqa", "mla", "tpa_kvonly", "tpa"):
            assert resolve({"attention_type": t}, preset)["heads"] == T6Config.from_preset(preset, t).num_attention_heads
    # the head count of Table 10 for MLA at small, not the closest count of Table 1's formula
    assert resolve({"attention_type": "mla"}, "small")["heads"] == 12
    # other ranks: the heads that bring the attention parameters closest to MHA's, as for the presets
    for preset, (width, head_dim, mha_heads) in {"tiny": (128, 32, 4), "mini": (512, 64, 8)}.items():
        for t, ranks in (("tpa", dict(k_rank=1, v_rank=1)), ("tpa", dict(q_rank=12)),
                         ("tpa_kvonly", dict(k_rank=4, v_rank=4)), ("tpa", dict(k_rank=6, v_rank=6))):
            row = resolve({"attention_type": t, **ranks}, preset)
            assert row["heads"] == matched_heads(t, width, head_dim, mha_heads, **ranks), (preset, t, ranks)
            assert row["model_overrides"] == {**ranks, "num_attention_heads": row["heads"]}
            assert row["target_attention_params"] == 4 * width * mha_heads * head_dim
            assert row["attention_params_per_layer"] == attention_parameters(t, width, row["heads"], head_dim, **ranks)
    assert resolve({"attention_type": "tpa", "k_rank": 1, "v_rank": 1}, "mini")["heads"] == 21
    # variants Table 1 does not count: the layer's own parameters (here non-contextual A's learned factors)
    row = resolve({"attention_type": "tpa", "tpa_contextual_a": False}, "mini")
    counts = {h: attention_layer_parameters(T6Config.from_preset("mini", "tpa", tpa_contextual_a=False,
                                                                 num_attention_heads=h)) for h in range(1, 40)}
    assert row["heads"] == min(counts, key=lambda h: abs(counts[h] - 4 * 512 * 8 * 64)) == 22
    # an override that leaves the parameters alone leaves the preset's heads
    assert resolve({"attention_type": "tpa", "tpa_head_activation": "softmax"}, "mini")["heads"] == 19


def test_fixed_heads_and_narrowed_projections():
    # TPA at MHA's head count: fewer attention parameters
    row = resolve({"attention_type": "tpa", "heads_of": "mha"}, "mini")
    assert (row["heads"], row["head_dim"], row["match"]) == (8, 64, "none")
    assert row["attention_params_per_layer"] == attention_parameters("tpa", 512, 8, 64) < 4 * 512 * 8 * 64
    # MHA at TPA's head count, head_dim narrowed to MHA's attention parameters (even, for RoPE)
    row = resolve({"attention_type": "mha", "heads_of": "tpa", "match_params": "head_dim"}, "mini")
    assert (row["heads"], row["head_dim"]) == (19, 26)
    assert row["model_overrides"] == {"num_attention_heads": 19, "head_dim": 26}
    assert abs(4 * 512 * 19 * 26 - 4 * 512 * 8 * 64) < abs(4 * 512 * 19 * 28 - 4 * 512 * 8 * 64)
    # GQA at small: 34 heads and 2 KV heads, head_dim 42
    row = resolve({"attention_type": "gqa", "heads_of": "tpa", "match_params": "head_dim"}, "small")
    assert (row["heads"], row["head_dim"]) == (34, 42)
    assert resolve({"attention_type": "mha", "num_attention_heads": 3}, "tiny")["heads"] == 3


@pytest.mark.parametrize("spec, message", [
    ({"k_rank": 1}, "attention_type must be one of"),
    ({"attention_type": "tpa", "num_layers": 2}, "unknown key num_layers"),
    ({"attention_type": "tpa", "max_steps": 2}, "schedule and data settings are the ablation's"),
    ({"attention_type": "tpa", "vocab_size": 64}, "follow the data"),
    ({"attention_type": "tpa", "num_attention_heads": 4, "match_params": True}, "chooses the head count"),
    ({"attention_type": "tpa", "heads_of": "mha", "num_attention_heads": 4}, "not both"),
    ({"attention_type": "tpa", "match_params": "maybe"}, "match_params must be"),
    ({"attention_type": "gqa", "heads_of": "tpa", "match_params": "head_dim"}, "must be a positive divisor"),
    ({"attention_type": "tpa", "k_rank": 0}, "k_rank must be an integer >= 1"),
    ({"attention_type": "tpa", "lr": 1e-3, "min_lr": 1e-2}, "need 0 <= min_lr <= lr"),
    ({"attention_type": "tpa", "lr": "fast"}, "lr and min_lr must be numbers"),
])
def test_bad_rows(spec, message):
    with pytest.raises(UsageError, match=message):
        resolve(spec)


def test_row_learning_rates():
    assert (resolve({"attention_type": "tpa", "lr": 4e-3})["lr"], resolve({"attention_type": "tpa", "lr": 4e-3})["min_lr"]) \
        == (4e-3, pytest.approx(4e-4))
    assert resolve({"attention_type": "tpa", "lr": 4e-3}, min_lr=1e-4)["min_lr"] == 1e-4
    assert resolve({"attention_type": "tpa"}, lr=2e-3)["lr"] == 2e-3


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_study_files_resolve_at_mini(path):
    """Every checked-in study is a valid grid at `mini`, the size BENCHMARKS.md plans it at."""
    rows = collect_rows(None, None, [str(path)])
    resolved = [resolve_row(n, s, "mini", lr=1e-3, min_lr=None) for n, s in rows]
    assert len(resolved) >= 3
    for row in resolved:
        T6Config.from_preset("mini", row["attention_type"], **row["model_overrides"])  # builds


# --------------------------------------------------------------------------------------------------
# Training a grid (tiny, a few steps)

GRID = ["a:attention_type=mha", "tpa_r1:attention_type=tpa,k_rank=1,v_rank=1", "a_again:attention_type=mha",
        "mha_narrow:attention_type=mha,heads_of=tpa,match_params=head_dim", "tpa_lr:attention_type=tpa,lr=5e-3"]


def grid_args(data: Path, out: Path, rows: list[str], *extra: str) -> list[str]:
    row_args = [a for r in rows for a in ("--row", r)]
    return ["ablate", "--data", str(data), "--preset", "tiny", *row_args, "--steps", "3", "--batch-size", "4",
            "--seq-len", "16", "--eval-every", "3", "--eval-sequences", "4", "--lr", "2e-3", "--device", "cpu",
            "--output", str(out), *extra]


def losses(record: dict) -> dict:
    return {(r["row"], r["seed"]): r["final_val_loss"] for r in record["runs"]}


@pytest.fixture(scope="module")
def grid(corpus, tmp_path_factory):
    """A partial grid (two rows, seed 0), then resumed to every row x seeds 0 and 1."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("grid") / "g"
    assert main(grid_args(corpus[1], out, GRID[:2], "--seeds", "0", "--no-plot")) == 0
    first = json.loads((out / "ablation.json").read_text())
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(grid_args(corpus[1], out, GRID, "--seeds", "0", "1", "--resume")) == 0
    return out, corpus[1], first, printed.getvalue()


def test_grid_rows_train_their_overrides(grid):
    out, _, _, _ = grid
    record = json.loads((out / "ablation.json").read_text())
    assert record["rows"] == ["a", "tpa_r1", "a_again", "mha_narrow", "tpa_lr"] and record["seeds"] == [0, 1]
    runs = {(r["row"], r["seed"]): r for r in record["runs"]}
    mc = {n: runs[(n, 0)]["model_config"] for n in record["rows"]}
    tc = {n: runs[(n, 0)]["train_config"] for n in record["rows"]}
    assert (mc["tpa_r1"]["k_rank"], mc["tpa_r1"]["v_rank"], mc["tpa_r1"]["num_attention_heads"]) == (1, 1, 6)
    assert (mc["a"]["attention_type"], mc["a"]["num_attention_heads"], mc["a"]["head_dim"]) == ("mha", 4, 32)
    assert (mc["mha_narrow"]["num_attention_heads"], mc["mha_narrow"]["head_dim"]) == (5, 26)
    assert (tc["tpa_lr"]["lr"], tc["tpa_lr"]["min_lr"]) == (5e-3, pytest.approx(5e-4))
    assert all((tc[n]["lr"], tc[n]["min_lr"]) == (2e-3, pytest.approx(2e-4)) for n in ("a", "tpa_r1", "mha_narrow"))
    # the same budget, data order and evaluation for every row of a seed
    shared = ("data_dir", "data_seed", "seed", "seq_len", "global_batch_size", "max_steps", "warmup_steps",
              "eval_every", "eval_sequences")
    for seed in (0, 1):
        configs = [runs[(n, seed)]["train_config"] for n in record["rows"]]
        assert all({k: c[k] for k in shared} == {k: configs[0][k] for k in shared} for c in configs)
    assert record["row_specs"]["mha_narrow"]["match"] == "head_dim"
    assert record["results"]["tpa_r1"]["heads"] == 6 and record["results"]["a"]["n_seeds"] == 2


def test_same_seed_repeats_and_seeds_differ(grid):
    out, _, _, _ = grid
    loss = losses(json.loads((out / "ablation.json").read_text()))
    for seed in (0, 1):  # two rows of one configuration: the same run, though trained in different calls
        assert loss[("a", seed)] == loss[("a_again", seed)]
    for row in ("a", "tpa_r1", "mha_narrow", "tpa_lr"):
        assert loss[(row, 0)] != loss[(row, 1)]
    assert loss[("tpa_r1", 0)] != loss[("a", 0)]


def test_resume_completes_a_partial_grid(grid):
    out, _, first, printed = grid
    assert first["rows"] == ["a", "tpa_r1"] and first["complete"] and len(first["runs"]) == 2
    assert "a seed 0: finished earlier, kept" in printed and "tpa_r1 seed 0: finished earlier, kept" in printed
    assert "a_again seed 0: val loss" in printed and "a seed 1: val loss" in printed
    record = json.loads((out / "ablation.json").read_text())
    assert record["complete"] and len(record["runs"]) == 10
    assert losses(record)[("a", 0)] == losses(first)[("a", 0)]  # the kept run, not a new one


def test_grid_table_plot_and_csv(grid):
    out, _, _, _ = grid
    text = (out / "ablation.md").read_text()
    record = json.loads((out / "ablation.json").read_text())
    assert "| row | params | attn. params / layer | heads | KV cache / token (bf16, all layers) | lr | seeds |" in text
    assert "training tokens per row and seed" in text
    body = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| row", "| :",
                                                                                               "| final"))]
    assert [line.split("|")[1].strip() for line in body[:5]] == record["rows"]
    assert "- `tpa_r1`: TPA, k_rank=1, v_rank=1; 6 heads of 32 (matched to MHA's attention parameters)" in text
    assert "- `mha_narrow`: MHA, heads_of=tpa; 5 heads of 26 (fixed; head_dim matched" in text
    assert "- `tpa_lr`: TPA, lr=0.005; 5 heads of 32 (matched to MHA's attention parameters); lr 0.005 -> 0.0005" in text
    for name in ("ablation.csv", "seeds.csv", "curves.csv"):
        with open(out / name) as f:
            rows = list(csv.DictReader(f))
        assert {r["row"] for r in rows} == set(record["rows"])
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # --replot draws the same table from ablation.json alone
    (out / "loss.png").unlink()
    assert main(["ablate", "--replot", str(out)]) == 0
    assert (out / "loss.png").is_file() and (out / "ablation.md").read_text() == text


def test_resume_and_merge_refuse_a_row_defined_otherwise(grid, tmp_path, capsys):
    out, data, _, _ = grid
    changed = ["tpa_r1:attention_type=tpa,k_rank=2,v_rank=2"]
    assert main(grid_args(data, out, changed, "--seeds", "0", "--resume", "--no-plot")) == 2
    assert "row tpa_r1: {'attention_type': 'tpa', 'k_rank': 1" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(grid_args(data, other, changed, "--seeds", "2", "--no-plot")) == 0
    assert main(["ablate", "--replot", str(out), str(other), "--output", str(tmp_path / "m"), "--no-plot"]) == 2
    assert "different settings (row tpa_r1" in capsys.readouterr().err
    # a row of the same definition from another call merges (seed 2 beside seeds 0 and 1)
    same = tmp_path / "same"
    assert main(grid_args(data, same, GRID[1:2], "--seeds", "2", "--no-plot")) == 0
    assert main(["ablate", "--replot", str(out), str(same), "--output", str(tmp_path / "m"), "--no-plot"]) == 0
    merged = json.loads((tmp_path / "m" / "ablation.json").read_text())
    assert merged["results"]["tpa_r1"]["seeds"] == [0, 1, 2] and merged["rows"][:2] == ["a", "tpa_r1"]
    assert [m for m in merged["missing"] if m[1] == 2] == [["a", 2], ["a_again", 2], ["mha_narrow", 2], ["tpa_lr", 2]]


def test_rows_file_and_types_together(corpus, tmp_path):
    path = tmp_path / "rows.yaml"
    path.write_text("rows:\n  - {name: tpa_sig, attention_type: tpa, tpa_head_activation: sigmoid}\n")
    out = tmp_path / "out"
    assert main(["ablate", "--data", str(corpus[1]), "--preset", "tiny", "--types", "mha", "--rows", str(path),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-sequences", "2", "--device", "cpu",
                 "--no-plot", "--output", str(out)]) == 0
    record = json.loads((out / "ablation.json").read_text())
    assert record["rows"] == ["mha", "tpa_sig"]
    assert record["runs"][1]["model_config"]["tpa_head_activation"] == "sigmoid"
    assert "| MHA |" in (out / "ablation.md").read_text()  # a plain type keeps its label beside named rows


def test_bad_row_on_the_command_line(corpus, tmp_path, capsys):
    assert main(grid_args(corpus[1], tmp_path / "x", ["r:attention_type=tpa,bogus=1"])) == 2
    assert "row r: unknown key bogus" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_dry_run_prints_the_plan_and_trains_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(grid_args(corpus[1], out, GRID[:2], "--seeds", "0", "1", "2", "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "2 rows x 3 seeds = 6 runs of 192 training tokens" in printed  # 3 steps x 4 x 16
    assert "| a | MHA | 4 | 32 | 65,536 |" in printed and "| tpa_r1 | TPA | 6 | 32 | 63,488 |" in printed
    assert not out.exists()
