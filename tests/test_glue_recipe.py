"""recipes/glue.py launched for real (accelerate launch, 1 and 2 processes) on a tiny random BERT and
slices of the real GLUE files: results, checkpoints, exact resume, exact sharded eval, bad input."""
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch

sys.path.insert(0, str(REPO / "recipes"))
import glue as glue_recipe  # noqa: E402


def common(glue_dir, tiny_bert, out, *extra):
    return ["--task_name", "mrpc", "--data_dir", str(glue_dir), "--model_name_or_path", str(tiny_bert),
            "--output_dir", str(out), "--max_train_samples", "128", "--max_eval_samples", "101",
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--logging_steps", "1", *extra]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_one_process_trains_evaluates_and_checkpoints(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "run"
    launch("recipes/glue.py", common(glue_dir, tiny_bert, out, "--num_train_epochs", "2",
                                     "--checkpointing_steps", "4", "--keep_checkpoints", "2", "--save_model"))
    r = results(out)
    assert r["completed_steps"] == 16  # 128 examples / 16 per batch x 2 epochs
    assert set(r) >= {"accuracy", "f1", "train_time_s", "train_samples_per_second", "peak_memory_mb"}
    assert 0.0 <= r["accuracy"] <= 1.0 and r["eval_samples"] == {"validation": 101}
    assert r["train_samples_per_second"] > 0 and r["peak_memory_mb"] > 0
    assert r["group_by_length"] is True  # the default: the exact resume tests below run with grouped batches
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000012", "step_00000016"]  # keep_checkpoints=2 removed 4 and 8
    newest = out / "checkpoints" / "step_00000016"
    assert (newest / "model.safetensors").is_file() and (newest / "optimizer.bin").is_file()
    assert json.loads((newest / "progress.json").read_text())["completed_steps"] == 16
    assert (out / "model" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == list(range(1, 17))  # --logging_steps 1
    # train_loss: the mean over the last epoch's 8 batches (updates 9-16), not the last log line's one batch
    last_epoch = [line["train/loss"] for line in log if "train/loss" in line and line["step"] > 8]
    assert r["train_loss"] == pytest.approx(sum(last_epoch) / 8, rel=1e-6)
    evals = [r for r in log if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [8, 16] and evals[-1]["eval/accuracy"] == r["accuracy"]


@pytest.mark.slow
def test_stsb_regression_reports_pearson_and_spearman(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "stsb"
    # a torch baseline with the clip hook attached, through accelerate's optimizer wrapper; mean pooling
    args = common(glue_dir, tiny_bert, out, "--max_train_steps", "3", "--optimizer", "adamw",
                  "--classifier_pooling", "mean", "--save_model")
    args[1] = "stsb"
    launch("recipes/glue.py", args)
    r = results(out)
    assert {"pearson", "spearmanr"} <= set(r) and "accuracy" not in r
    assert r["optimizer"] == "adamw" and r["completed_steps"] == 3
    assert json.loads((out / "model" / "config.json").read_text())["classifier_pooling"] == "mean"


@pytest.mark.slow
def test_resumed_run_continues_exactly(glue_dir, tiny_bert, tmp_path):
    """Train 12 updates (1.5 epochs, checkpoint at 6 and in mid-epoch at 10); resume from step 10 in a
    new process and reach the same loss and dev metrics, to the last bit."""
    full = tmp_path / "full"
    args = ["--max_train_steps", "12", "--checkpointing_steps", "5", "--keep_checkpoints", "3",
            "--adaptive_clip", "--lr_scheduler", "cosine"]
    launch("recipes/glue.py", common(glue_dir, tiny_bert, full, *args))
    resumed = tmp_path / "resumed"
    launch("recipes/glue.py", common(glue_dir, tiny_bert, resumed, *args, "--resume_from_checkpoint",
                                     str(full / "checkpoints" / "step_00000010")))
    a, b = results(full), results(resumed)
    assert b["resumed_from"].endswith("step_00000010") and b["completed_steps"] == 12
    for key in ("accuracy", "f1", "train_loss"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_two_processes_see_each_dev_example_once(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "ddp"
    # 101 dev rows over 2 ranks x 64: the last batch is padded with duplicates that must be dropped.
    launch("recipes/glue.py", common(glue_dir, tiny_bert, out, "--max_train_steps", "4"), processes=2)
    r = results(out)
    assert r["num_processes"] == 2 and r["total_batch_size"] == 32
    assert r["eval_samples"] == {"validation": 101}  # the recipe checks idx coverage and raises otherwise
    assert 0.0 <= r["accuracy"] <= 1.0


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        glue_recipe.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def write_task(root: Path, name: str, header: str, rows: list[str]) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    for split in ("train.tsv", "dev.tsv"):
        (root / name / split).write_text("\n".join([header, *rows]) + "\n")
    return root


@pytest.mark.parametrize("case", ["unknown_task", "no_data", "missing_dir", "malformed", "bad_label",
                                  "model_missing", "two_sources", "no_train_split", "bad_checkpointing",
                                  "incomplete_checkpoint"])
def test_bad_input_stops_before_training_with_a_clear_message(case, glue_dir, tiny_bert, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    base = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tiny_bert)]
    rte = "index\tsentence1\tsentence2\tlabel"
    if case == "unknown_task":
        err = _fails(["--task_name", "mrcp", "--data_dir", str(glue_dir), *base], capsys)
        assert "invalid choice: 'mrcp'" in err
    elif case == "no_data":
        err = _fails(["--task_name", "rte", *base], capsys)
        assert "pass --data_dir (or set GLUE_DIR)" in err
    elif case == "missing_dir":
        err = _fails(["--task_name", "rte", "--data_dir", str(tmp_path / "nope"), *base], capsys)
        assert str(tmp_path / "nope") in err
    elif case == "malformed":
        root = write_task(tmp_path / "g", "RTE", rte, ["0\tA premise.\tentailment"])  # 3 fields of 4
        err = _fails(["--task_name", "rte", "--data_dir", str(root), *base], capsys)
        assert "train.tsv" in err and "line 2" in err
    elif case == "bad_label":
        root = write_task(tmp_path / "g", "RTE", rte, ["0\tA premise.\tA hypothesis.\tmaybe"])
        err = _fails(["--task_name", "rte", "--data_dir", str(root), *base], capsys)
        assert "'maybe'" in err and "entailment" in err
    elif case == "model_missing":
        err = _fails(["--task_name", "rte", "--data_dir", str(glue_dir), "--output_dir", str(tmp_path / "o"),
                      "--model_name_or_path", str(tmp_path / "no-model")], capsys)
        assert "does not exist" in err
    elif case == "two_sources":
        err = _fails(["--task_name", "rte", "--data_dir", str(glue_dir), "--train_file", "x.csv",
                      "--validation_file", "y.csv", *base], capsys)
        assert "one data source" in err
    elif case == "no_train_split":
        err = _fails(["--task_name", "qnli", "--data_dir", str(glue_dir), *base], capsys)
        assert "no training split" in err
    elif case == "bad_checkpointing":
        err = _fails(["--task_name", "rte", "--data_dir", str(glue_dir), "--checkpointing_steps", "often", *base],
                     capsys)
        assert "--checkpointing_steps must be a positive integer or 'epoch'" in err
    elif case == "incomplete_checkpoint":
        half = tmp_path / "out" / "checkpoints" / "step_00000004.tmp"  # a write that crashed
        half.mkdir(parents=True)
        err = _fails(["--task_name", "rte", "--data_dir", str(glue_dir), "--resume_from_checkpoint", str(half),
                      *base], capsys)
        assert "not a complete checkpoint" in err


@pytest.mark.slow
def test_lora_trains_only_adapters_and_head(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "lora"
    launch("recipes/glue.py", common(glue_dir, tiny_bert, out, "--max_train_steps", "3", "--lora", "--lora_r", "4"))
    r = results(out)
    # rank-4 adapters on q/k/v of 2 layers + the 2-class head: a small fraction of the 1M-parameter model
    assert 0 < r["trainable_parameters"] < 0.05 * r["parameters"]


@pytest.mark.slow
def test_fp16_mixed_precision_comes_from_the_launch_config(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "fp16"
    launch("recipes/glue.py", common(glue_dir, tiny_bert, out, "--max_train_steps", "4"), mixed_precision="fp16")
    r = results(out)
    assert r["mixed_precision"] == "fp16" and r["completed_steps"] == 4
    assert 0.0 <= r["accuracy"] <= 1.0
