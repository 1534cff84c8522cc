"""lm-evaluation-harness on a saved T6 directory, offline, with local tasks: through lm-eval's own command
line (auto_map remote code, no `import tpa` by the caller) and through `tpa eval harness`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import subprocess_env
from tests.eval.fixtures import write_tasks
from tpa.cli import main
from tpa.eval.harness import paper_table, table_rows

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def tasks(corpus, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder, corpus[2])
    return folder


@pytest.fixture(scope="module")
def harness_run(trained_model, tasks, tmp_path_factory) -> dict:
    """`tpa eval harness` on the multiple-choice, loglikelihood and both rolling tasks, 0- and 2-shot."""
    out = tmp_path_factory.mktemp("harness")
    rc = main(["eval", "harness", "--model", str(trained_model), "--tasks",
               "tpa_test_mc,tpa_test_ll", "tpa_test_rolling", "tpa_test_rolling_shuffled",
               "--include-path", str(tasks), "--num-fewshot", "0", "2", "--device", "cpu", "--batch-size", "4",
               "--bootstrap-iters", "0", "--offline", "--output", str(out)])
    assert rc == 0
    return {"out": out, "record": json.loads((out / "harness.json").read_text())}


def test_lm_eval_command_line_loads_the_directory_by_remote_code(trained_model, tasks, harness_run, tmp_path):
    exe = shutil.which("lm_eval") or shutil.which("lm-eval")
    cmd = [exe] if exe else [sys.executable, "-m", "lm_eval"]
    out = tmp_path / "lm_eval_out"
    offline = subprocess_env(import_tests=False, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                             TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        cmd + ["--model", "hf", "--model_args", f"pretrained={trained_model},trust_remote_code=True",
               "--tasks", "tpa_test_mc", "--include_path", str(tasks), "--device", "cpu", "--num_fewshot", "0",
               "--batch_size", "4", "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=offline)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, files
    result = json.loads(files[0].read_text())["results"]["tpa_test_mc"]
    assert 0.0 <= result["acc,none"] <= 1.0 and 0.0 <= result["acc_norm,none"] <= 1.0
    # the same task through `tpa eval harness` (import tpa, HFLM on the loaded model) gives the same numbers
    ours = harness_run["record"]["runs"]["0"]["results"]["tpa_test_mc"]
    assert ours["acc,none"] == pytest.approx(result["acc,none"], abs=1e-9)
    assert ours["acc_norm,none"] == pytest.approx(result["acc_norm,none"], abs=1e-9)


def test_tpa_eval_harness_multiple_choice_zero_and_two_shot(harness_run):
    record = harness_run["record"]
    assert set(record["runs"]) == {"0", "2"}
    for shots in ("0", "2"):
        mc = record["runs"][shots]["results"]["tpa_test_mc"]
        assert 0.0 <= mc["acc,none"] <= 1.0
        assert record["runs"][shots]["n-shot"]["tpa_test_mc"] == int(shots)
        # a model trained on the corpus prefers the grammatical ending to nonsense (chance is 1/3)
        assert mc["acc,none"] >= 0.75, mc
    text = (harness_run["out"] / "harness.md").read_text()
    header = "| Method | n-shot | tpa_test_mc | tpa_test_ll | tpa_test_rolling | tpa_test_rolling_shuffled | Avg. |"
    assert header in text
    rows = [line for line in text.splitlines() if line.startswith("| run/final |")]
    assert [r.split("|")[2].strip() for r in rows] == ["0", "2"]


def test_loglikelihood_and_rolling_perplexity_tasks(harness_run):
    results = harness_run["record"]["runs"]["0"]["results"]
    ll = results["tpa_test_ll"]
    assert 0.0 <= ll["acc,none"] <= 1.0 and ll["perplexity,none"] >= 1.0
    real, shuffled = results["tpa_test_rolling"], results["tpa_test_rolling_shuffled"]
    for r in (real, shuffled):
        assert r["word_perplexity,none"] >= 1.0 and r["bits_per_byte,none"] > 0.0
    # the model has learned word order: in-order sentences are far more likely than shuffled ones
    assert real["word_perplexity,none"] * 2 < shuffled["word_perplexity,none"], (real, shuffled)
    table = harness_run["record"]["table"]
    assert table["columns"] == ["tpa_test_mc", "tpa_test_ll", "tpa_test_rolling", "tpa_test_rolling_shuffled"]
    zero = table["rows"][0]
    assert zero["metrics"] == {"tpa_test_mc": "acc", "tpa_test_ll": "acc", "tpa_test_rolling": "word_perplexity",
                               "tpa_test_rolling_shuffled": "word_perplexity"}
    assert zero["values"]["tpa_test_rolling"] == pytest.approx(real["word_perplexity,none"])
    assert zero["avg"] == pytest.approx(50 * (results["tpa_test_mc"]["acc,none"] + ll["acc,none"]))


def test_paper_table_uses_the_papers_metric_and_order():
    runs = {0: {"results": {
        "custom": {"acc,none": 0.25, "acc_stderr,none": 0.01},
        "boolq": {"acc,none": 0.6, "acc_stderr,none": 0.01},
        "arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.4},
        "hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.35},
        "mmlu": {"acc,none": 0.26},
    }}, 2: {"results": {"arc_easy": {"acc,none": 0.55, "acc_norm,none": 0.45}, "boolq": {"acc,none": 0.62}}}}
    columns, rows = table_rows(runs, ["custom", "boolq", "arc_easy", "hellaswag", "mmlu"])
    assert columns == ["ARC-E", "BoolQ", "HellaSw.", "MMLU", "custom"]
    assert rows[0]["values"] == pytest.approx({"ARC-E": 40.0, "BoolQ": 60.0, "HellaSw.": 35.0, "MMLU": 26.0,
                                               "custom": 25.0})
    assert rows[0]["metrics"]["ARC-E"] == "acc_norm" and rows[0]["metrics"]["BoolQ"] == "acc"
    assert rows[0]["avg"] == pytest.approx((40 + 60 + 35 + 26 + 25) / 5)
    assert rows[1]["values"] == pytest.approx({"ARC-E": 45.0, "BoolQ": 62.0}) and rows[1]["avg"] == pytest.approx(53.5)
    text = paper_table("T6-TPA", columns, rows)
    assert "| T6-TPA | 0 | 40.00 | 60.00 | 35.00 | 26.00 | 25.00 | 37.20 |" in text
    assert "| T6-TPA | 2 | 45.00 | 62.00 |  |  |  | 53.50 |" in text


def test_harness_bad_arguments_fail_clearly(trained_model, tasks, tmp_path, capsys):
    assert main(["eval", "harness", "--model", str(tmp_path), "--tasks", "tpa_test_mc", "--offline"]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert main(["eval", "harness", "--model", str(trained_model), "--tasks", "no_such_task_xyz", "--device", "cpu",
                 "--include-path", str(tasks), "--offline"]) == 2
    assert "unknown lm-eval task(s) 'no_such_task_xyz'" in capsys.readouterr().err
    assert main(["eval", "harness", "--model", str(trained_model), "--tasks", "tpa_test_mc", "--device", "cpu",
                 "--include-path", str(tmp_path / "nowhere"), "--offline"]) == 2
    assert "is not a folder of task YAML files" in capsys.readouterr().err
