"""The optimizer study (adaptopt.study): statistics on known numbers, the shipped study files, and a tiny
study run for real through `python -m adaptopt.study` (accelerate launch of recipes/glue.py on a tiny
random BERT and slices of the real MRPC files): runs in parallel, a failing run recorded while the
others finish, resume that reruns only what is missing, statistics equal to scipy/statsmodels computed
directly on the results.json files, plots and report written."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from adaptopt.study import stats
from adaptopt.study.config import FULL, StudyConfigError, load_study, to_flags
from adaptopt.study.plots import PLOTS
from adaptopt.study.records import final_train_loss
from adaptopt.launch import available_cores, threads_per_process
from adaptopt.study.runner import Runner, check_unchanged, run_dir, stderr_tail
from conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- statistics on known numbers --------------------------------------------------------------------
def test_describe_mean_std_and_t_interval():
    d = stats.describe([1.0, 2.0, 3.0, 4.0])
    assert d["n"] == 4 and d["mean"] == 2.5
    assert d["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std, ddof=1
    assert d["ci95"] == pytest.approx(3.182446305 * math.sqrt(5 / 3) / 2)  # t(0.975, 3) = 3.1824
    one = stats.describe([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["std"]) and math.isnan(one["ci95"])
    assert stats.describe([])["n"] == 0


def test_anova_textbook_example():
    # The classic one-way ANOVA example (three groups of six): F = 9.265 on (2, 15) df, p = 0.0024.
    result = stats.anova({"a1": [6, 8, 4, 5, 3, 4], "a2": [8, 12, 9, 11, 6, 8], "a3": [13, 9, 11, 8, 7, 12]})
    assert result["F"] == pytest.approx(9.264706, rel=1e-6) and result["p"] == pytest.approx(0.0023988, rel=1e-4)
    assert (result["df_between"], result["df_within"]) == (2, 15)


def test_anova_and_tukey_leave_out_groups_with_one_value_and_need_two_groups():
    assert stats.anova({"a": [1.0, 2.0], "b": [3.0]}) is None and stats.tukey({"a": [1.0, 2.0], "b": [3.0]}) is None
    result = stats.anova({"a": [1.0, 2.0], "b": [3.0, 5.0], "c": [9.0]})
    assert result["groups"] == ["a", "b"]
    constant = stats.anova({"a": [1.0, 1.0], "b": [1.0, 1.0]})
    assert math.isnan(constant["p"])  # undefined, and said so, not a made-up number


def test_tukey_matches_scipy_and_equals_the_pooled_t_test_for_two_groups():
    rng = np.random.default_rng(0)
    groups = {"sgd": rng.normal(0.0, 1, 4), "adam": rng.normal(0.4, 1, 4), "adamw": rng.normal(2.5, 1, 3)}
    rows = stats.tukey({k: v.tolist() for k, v in groups.items()})
    ref = sps.tukey_hsd(*groups.values())
    index = {name: i for i, name in enumerate(groups)}
    assert {(r["a"], r["b"]) for r in rows} == {("adam", "adamw"), ("adam", "sgd"), ("adamw", "sgd")}
    for r in rows:
        i, j = index[r["a"]], index[r["b"]]
        assert r["p"] == pytest.approx(ref.pvalue[i, j], rel=1e-6)
        assert r["meandiff"] == pytest.approx(groups[r["b"]].mean() - groups[r["a"]].mean())
        ci = ref.confidence_interval()
        assert (r["lower"], r["upper"]) == pytest.approx((-ci.high[i, j], -ci.low[i, j]), rel=1e-6)
        assert r["reject"] == (ref.pvalue[i, j] < 0.05)
    # k = 2: the studentized range q = sqrt(2)|t|, so Tukey's p is the pooled two-sample t-test's p.
    a, b = [0.81, 0.84, 0.80], [0.86, 0.88, 0.85]
    assert stats.tukey({"a": a, "b": b})[0]["p"] == pytest.approx(sps.ttest_ind(a, b).pvalue, rel=1e-6)


def test_welch_by_hand():
    a, b = [0.80, 0.82, 0.85], [0.70, 0.78, 0.74, 0.76]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)  # Welch-Satterthwaite
    result = stats.welch(a, b)
    assert result["t"] == pytest.approx(t) and result["p"] == pytest.approx(2 * sps.t.sf(abs(t), df))
    assert result["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert stats.welch([1.0], [2.0, 3.0]) is None


# -- the study files ---------------------------------------------------------------------------------
def test_final_train_loss_weights_each_logged_window_by_its_updates_over_the_last_epoch():
    train = {10: {"train/loss": 1.0}, 20: {"train/loss": 2.0}, 25: {"train/loss": 4.0}}
    # evaluations after updates 12 and 25 (epoch ends): updates 13-20 at 2.0 (the window 11-20 straddles the
    # epoch start: only its 8 updates inside count), 21-25 at 4.0
    assert final_train_loss(train, {12: {}, 25: {}}) == pytest.approx((8 * 2.0 + 5 * 4.0) / 13)
    assert final_train_loss(train, {25: {}}) == pytest.approx((10 * 1.0 + 10 * 2.0 + 5 * 4.0) / 25)  # one epoch
    assert final_train_loss(train, {}) is None and final_train_loss({}, {25: {}}) is None


def test_loss_curves_leave_out_a_last_window_of_a_few_updates(tmp_path):
    from adaptopt.study.aggregate import _curves
    from adaptopt.study.records import RunRecord

    records = []
    for seed, losses in enumerate(([0.7, 0.5, 0.1], [0.6, 0.4, 0.9])):
        (tmp_path / str(seed)).mkdir()
        # logged after updates 10, 20 and 21: the last line is one update's loss
        (tmp_path / str(seed) / "train_log.jsonl").write_text("".join(
            json.dumps({"step": step, "train/loss": loss, "train/lr": lr}) + "\n"
            for step, loss, lr in zip((10, 20, 21), losses, (1e-5, 3e-5 * (seed + 1), 1e-5))))
        records.append(RunRecord(None, tmp_path / str(seed), "finished", {}, {}))
    curve = _curves(records)
    assert curve["step"] == [10, 20] and curve["seeds"] == 2
    assert curve["loss_mean"] == pytest.approx([0.65, 0.45])
    assert curve["lr_peak"] == pytest.approx(4.5e-5)  # each run's own peak (3e-5, 6e-5), then their mean


def test_an_undefined_correlation_counts_as_zero_and_other_numbers_pass_through(tmp_path):
    """A run that predicts one constant STS-B score has NaN Pearson/Spearman in results.json (scipy); the
    study reads them as 0, so one such seed does not make its task's means and tests NaN."""
    from adaptopt.study.records import RunRecord

    results = json.loads(json.dumps({"pearson": float("nan"), "spearmanr": 0.25, "eval_loss": float("nan"),
                                     "accuracy": 0.5, "flag": True}))
    record = RunRecord(None, tmp_path, "finished", results, {})
    assert record.value("pearson") == 0.0 and record.value("spearmanr") == 0.25 and record.value("accuracy") == 0.5
    assert math.isnan(record.value("eval_loss"))  # not a correlation: a NaN loss stays NaN
    assert record.value("flag") is None and record.value("missing") is None


def test_best_lr_compares_only_lrs_with_the_most_seeds():
    """A partial study: one seed at 1e-4 (lucky 0.90) must not beat three seeds at 5e-5 (mean 0.86)."""
    from types import SimpleNamespace

    from adaptopt.study.aggregate import _best_lr

    results = {2e-5: [0.80, 0.82, 0.81], 5e-5: [0.85, 0.87, 0.86], 1e-4: [0.90], 2e-4: []}
    study = SimpleNamespace(lr_sweep={"adamw": list(results)}, default_lr=lambda name: 5e-5)

    def runs(optimizer, lr):
        return [SimpleNamespace(status="finished", value=lambda key, v=v: v) for v in results[lr]]

    assert _best_lr(study, "adamw", "accuracy", runs) == 5e-5
    results[1e-4] += [0.70, 0.71]  # all three seeds in: now a plain best mean (0.77 < 0.86)
    results[2e-4] += [0.88, 0.89, 0.87]
    assert _best_lr(study, "adamw", "accuracy", runs) == 2e-4
    assert _best_lr(study, "adamw", "train_loss", runs) == 1e-4  # lower is better
    results.update({lr: [] for lr in results})
    assert _best_lr(study, "adamw", "accuracy", runs) is None


def test_glue_study_expands_to_the_issue_grid(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    study = load_study(REPO / "studies" / "glue.yaml")
    runs = study.runs()
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 153  # 3 tasks x (21 main + 18 sweep + 12 ablation)
    assert study.seeds == [1, 2, 3] and list(study.tasks) == ["mrpc", "rte", "sst2"]
    assert list(study.optimizers) == ["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "adaptopt"]
    for task in study.tasks:
        for opt in study.optimizers:  # every optimizer at the registry's (papers') default LR, every seed
            main = [r for r in runs if (r.task, r.optimizer, r.variant) == (task, opt, FULL)
                    and r.learning_rate == study.default_lr(opt)]
            assert sorted(r.seed for r in main) == [1, 2, 3]
        for opt in ("adamw", "adaptopt"):
            lrs = sorted({r.learning_rate for r in runs if (r.task, r.optimizer, r.variant) == (task, opt, FULL)})
            assert lrs == [2e-5, 5e-5, 1e-4, 2e-4]
        variants = {r.variant: r for r in runs if r.task == task and r.optimizer == "adaptopt" and r.seed == 1
                    and r.learning_rate == 2e-5}
        assert set(variants) == {FULL, "no_adaptive_lr", "no_adaptive_momentum", "no_clipping", "all_off"}
        args = lambda v: variants[v].recipe_args()  # noqa: E731
        assert args("no_adaptive_lr")[-2:] == ["--adaptive_lr", "none"]  # the variant's flag wins over the pinned rule
        assert "--no_adaptive_momentum" not in args("no_adaptive_lr")
        assert args("no_clipping")[args("no_clipping").index("--max_grad_norm") + 1] == "0"
        assert {"none", "--no_adaptive_momentum"} <= set(args("all_off"))
        assert args(FULL)[args(FULL).index("--adaptive_lr") + 1] == "hypergradient"  # the papers' rule, pinned
        assert args(FULL)[args(FULL).index("--max_grad_norm") + 1] == "1.0"
    for r in runs:
        a = r.recipe_args()
        assert a[a.index("--data_dir") + 1] == "${GLUE_DIR}" and "--model_name_or_path" not in a  # default model
        assert r.launch_args()[a.index("--data_dir") + 1] == "/data/glue"  # expanded only to launch
        assert ("--max_train_samples" in a) == (r.task == "sst2")
    assert study.primary_metric("mrpc") == "f1" and study.primary_metric("rte") == "accuracy"
    assert (study.candidate, study.baseline) == ("adaptopt", "adamw")


def test_runs_patterns_select_by_run_name_and_refuse_a_pattern_that_matches_nothing(monkeypatch, capsys):
    """--runs picks runs by name (shell patterns, combined with --tasks), so the runs a verdict needs can go
    first; a pattern that matches no run stops with the reason instead of running nothing."""
    from adaptopt.study.__main__ import main, select

    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    study = load_study(REPO / "studies" / "glue.yaml")
    specs = study.runs()
    verdict = select(study, specs, None, ["*-adamw-*", "*-adaptopt-lr2e-05-*"])
    assert len(verdict) == 3 * 3 * (4 + 1)  # tasks x seeds x (AdamW's 4 LRs + AdaptOpt at its default)
    assert [s for s in specs if s in verdict] == verdict  # plan order kept
    assert {s.name for s in select(study, specs, ["rte"], ["*-adamw-*"])} == {
        f"rte-adamw-lr{lr!r}-seed{seed}" for lr in (2e-5, 5e-5, 1e-4, 2e-4) for seed in (1, 2, 3)}
    with pytest.raises(StudyConfigError, match="matches no run"):
        select(study, specs, None, ["*-adamw-*", "*-adamx-*"])
    with pytest.raises(StudyConfigError, match=r"--tasks \['qqp'\] are not in the study"):
        select(study, specs, ["qqp"], None)
    assert main(["--config", str(REPO / "studies" / "glue.yaml"), "--plan", "--runs", "*-adamx-*"]) == 2
    assert "--runs '*-adamx-*' matches no run" in capsys.readouterr().err


def test_tiny_study_file_parses(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    study = load_study(REPO / "studies" / "tiny.yaml")
    assert len(study.runs()) == 10 and study.ablation == {
        "all_off": {"adaptive_lr": "none", "no_adaptive_momentum": True, "max_grad_norm": 0}}


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("tasks: [mrpc]\noptimizers: [adamx]\nseeds: [1]", "unknown optimizer 'adamx'"),
    ("tasks: [mrpc]\noptimizers: [adamw]\nseeds: [1]\nlr_swep: {}", "unknown key(s) ['lr_swep']"),
    ("tasks: [mrpc]\noptimizers: [adamw]\nseeds: [1]\nlr_sweep: {adamw: [fast]}", "'fast' is not a number"),
    ("tasks: [mrpc]\noptimizers: [adamw]\nseeds: [1]\nargs: {seed: 3}", "['seed'] are set by the study"),
    ("tasks: [mrpc]\noptimizers: [adamw]\nseeds: [1, 1]", "seeds must be a list of distinct integers"),
    ("tasks: [mrcp]\noptimizers: [adamw]\nseeds: [1]", "unknown GLUE task(s) ['mrcp']"),
    ("tasks: [mrpc]\noptimizers: [adamw]\nseeds: [1]\nargs: {data_dir: '${STUDY_TEST_UNSET}'}", "is not set"),
    ("tasks: [mrpc]\nseeds: [1]", "'optimizers' is required"),
])
def test_bad_study_files_are_refused_with_the_reason(tmp_path, monkeypatch, text, message):
    monkeypatch.delenv("STUDY_TEST_UNSET", raising=False)
    with pytest.raises(StudyConfigError) as err:
        load_study(_write(tmp_path, text))
    assert message in str(err.value)


def test_yaml_1_1_exponents_and_flags():
    assert to_flags({"max_length": 64, "no_adaptive_momentum": True, "lora": False, "x": None, "m": [1, 2]}) == [
        "--max_length", "64", "--no_adaptive_momentum", "--m", "1", "2"]


def test_threads_split_the_cores_between_parallel_runs():
    assert threads_per_process(["--num_processes", "1"], cores=8, concurrent_runs=2) == 4
    assert threads_per_process(["--num_processes", "2"], cores=8, concurrent_runs=2) == 2
    assert threads_per_process([], cores=2, concurrent_runs=4) == 1


def test_stderr_tail_treats_progress_bar_rewrites_as_lines(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_text("a\n 10%|#\r 50%|#####\rTraceback\nValueError: bad\n")
    assert stderr_tail(log, 3) == " 50%|#####\nTraceback\nValueError: bad"


def test_shards_split_the_grid_by_index_and_slurm_arrays_pick_theirs(monkeypatch):
    """N runners share a study without coordinating: shard i takes the runs whose index in the grid is i mod N,
    whatever has finished; inside a SLURM job array the task id and count are the default."""
    from adaptopt.study.__main__ import parse_shard, select

    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    study = load_study(REPO / "studies" / "lr_free.yaml")
    specs = study.runs()
    parts = [select(study, specs, None, None, (i, 3)) for i in range(3)]
    assert sorted(s.name for part in parts for s in part) == sorted(s.name for s in specs)  # each run in one shard
    assert [s.name for s in parts[1]] == [s.name for s in specs[1::3]]
    assert select(study, specs, ["mrpc"], None, (0, 2)) == [s for s in specs[0::2] if s.task == "mrpc"]

    def fail(message):
        raise ValueError(message)

    assert parse_shard("1/4", {}, fail) == (1, 4) and parse_shard(None, {}, fail) is None
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"},
                       fail) == (1, 2)
    for bad in ("4/4", "1", "a/b"):
        with pytest.raises(ValueError, match="--shard must be I/N"):
            parse_shard(bad, {}, fail)


def test_run_records_hold_no_machine_path_and_a_changed_default_refuses_the_run(monkeypatch):
    """A run's identity is its arguments as the study file writes them (${GLUE_DIR} unexpanded) and the
    library defaults it ran with, wherever no flag set the value: the committed records of studies/glue.yaml
    count on a machine that keeps the data elsewhere, while a default changed since refuses a run."""
    from adaptopt.study.runner import RESTATED_DEFAULTS, find_run, portable_command, read_run_info, same_run

    monkeypatch.setenv("GLUE_DIR", "/somewhere/else/glue")
    study = load_study(REPO / "studies" / "glue.yaml", REPO / "studies" / "results" / "glue")
    specs = study.runs()
    check_unchanged(study, specs)  # all 153 committed runs are today's runs
    spec = next(s for s in specs if s.name == "mrpc-adaptopt-lr2e-05-seed1")
    assert spec.launch_args()[spec.launch_args().index("--data_dir") + 1] == "/somewhere/else/glue"
    info = read_run_info(find_run(study, spec))
    # (the runs ran before the study file pinned --no_group_by_length, which restates what they did)
    today = [a for a in portable_command(study, spec, run_dir(study, spec)) if a not in RESTATED_DEFAULTS]
    assert "${GLUE_DIR}" in info["recipe_args"] and info["command"] == today
    assert not any(str(REPO) in a or "/work/" in a for a in info["command"])
    assert same_run(spec, info) is None
    # the run pinned --adaptive_lr hypergradient and --learning_rate: today's different defaults for those do not
    # matter; a default no flag sets does
    assert info["optimizer_defaults"]["adaptive_lr"] is True and info["optimizer_defaults"]["lr"] == 2e-5
    changed = dict(info, optimizer_defaults=dict(info["optimizer_defaults"], momentum_rate=0.5))
    assert "momentum_rate changed since it ran" in same_run(spec, changed)
    assert "arguments differ" in same_run(spec, dict(info, recipe_args=info["recipe_args"][:-2]))


def test_a_switch_restating_an_old_recipe_default_keeps_the_runs_from_before_it(monkeypatch):
    """The study files pin --no_group_by_length (random batches, what the recipe did before grouping became its
    default). Their committed runs, recorded without the switch and from before the recipe wrote group_by_length
    into results.json, are those runs; a run recorded without it that grouped its batches is not."""
    from adaptopt.study.runner import find_run, read_results, read_run_info, same_run

    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    glue = load_study(REPO / "studies" / "glue.yaml", REPO / "studies" / "results" / "glue")
    spec = next(s for s in glue.runs() if s.name == "sst2-adamw-lr5e-05-seed1")
    assert "--no_group_by_length" in spec.recipe_args()
    directory = find_run(glue, spec)
    info, results = read_run_info(directory), read_results(directory)
    assert "--no_group_by_length" not in info["recipe_args"] and "group_by_length" not in results
    assert same_run(spec, info, results=results) is None
    assert same_run(spec, info, results=dict(results, group_by_length=False)) is None
    assert "arguments differ" in same_run(spec, info, results=dict(results, group_by_length=True))
    # recorded with the switch (a run launched from today's study file): the same run by its arguments alone
    assert same_run(spec, dict(info, recipe_args=spec.recipe_args()), results=dict(results, group_by_length=False)) is None
    # the switch stands in only for itself: another missing argument still differs
    assert "arguments differ" in same_run(spec, dict(info, recipe_args=info["recipe_args"][:-2]), results=results)
    # lr_free.yaml reuses AdamW's SST-2 and MRPC runs of glue.yaml through the same rule
    lr_free = load_study(REPO / "studies" / "lr_free.yaml", REPO / "studies" / "results" / "lr_free")
    reused = next(s for s in lr_free.runs() if s.name == "sst2-adamw-lr5e-05-seed1")
    assert find_run(lr_free, reused).resolve() == directory.resolve()


def test_a_run_past_the_timeout_is_killed(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    runner = Runner(load_study(REPO / "studies" / "tiny.yaml", tmp_path / "study"), timeout=0.5, log=lambda m: None)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    start = time.monotonic()
    assert runner._wait(proc, tmp_path) == (None, True) and time.monotonic() - start < 5 and proc.poll() is not None


def test_a_study_reuses_the_finished_runs_of_another_with_the_same_arguments(monkeypatch, tmp_path):
    """studies/lr_free.yaml reuses AdamW's MRPC and SST-2 runs of studies/glue.yaml (same protocol): they count as
    finished and are read from there; a run of another protocol is not reused."""
    from adaptopt.study.records import load_records
    from adaptopt.study.runner import find_run

    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    study = load_study(REPO / "studies" / "lr_free.yaml", tmp_path / "lr_free")
    specs = study.runs()
    reused = [s for s in specs if find_run(study, s) != run_dir(study, s)]
    assert len(reused) == 24 and {(s.task, s.optimizer) for s in reused} == {("mrpc", "adamw"), ("sst2", "adamw")}
    records = {r.spec.name: r for r in load_records(study, specs)}
    assert records["mrpc-adamw-lr0.0001-seed1"].status == "finished" and records["stsb-adamw-lr0.0001-seed1"].status \
        == "pending"
    other = load_study(REPO / "studies" / "lr_free.yaml", tmp_path / "other")
    other.args = dict(other.args, max_length=64)  # another protocol: the same names, other arguments
    assert all(find_run(other, s) == run_dir(other, s) for s in other.runs())


# -- a tiny study, run for real ----------------------------------------------------------------------
def study_cli(*args, check_code=None):
    proc = subprocess.run([sys.executable, "-m", "adaptopt.study", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    if check_code is not None and proc.returncode != check_code:
        raise AssertionError(f"exit {proc.returncode}, expected {check_code}:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def assert_stat(got, expected) -> None:
    """summary.json writes a statistic that is not finite (NaN: no variance at all; inf) as null."""
    assert got is None if not math.isfinite(expected) else got == pytest.approx(expected, rel=1e-9)


def results_of(out: Path, pattern: str) -> list[dict]:
    """results.json of each run, plus final_train_loss from its train_log.jsonl. The tiny study trains one
    epoch of 3 updates and logs every update, so that is the plain mean of the logged losses (a rerun
    appends its lines again: the last line of a step counts)."""
    results = []
    for p in sorted((out / "runs").glob(f"{pattern}/results.json")):
        lines = [json.loads(line) for line in (p.parent / "train_log.jsonl").read_text().splitlines()]
        losses = {line["step"]: line["train/loss"] for line in lines if "train/loss" in line}
        assert sorted(losses) == [1, 2, 3]
        results.append({**json.loads(p.read_text()), "final_train_loss": float(np.mean(list(losses.values())))})
    return results


@pytest.fixture(scope="module")
def tiny_study(glue_dir, tiny_bert, tmp_path_factory):
    """Runs the study (2 at a time), deletes one finished run's results.json (a run killed before it
    finished), and runs it again with --skip_failed. Returns what each step saw."""
    root = tmp_path_factory.mktemp("study")
    config = {
        "seeds": [1, 2],
        "args": {"data_dir": str(glue_dir), "model_name_or_path": str(tiny_bert), "max_train_samples": 48,
                 "max_eval_samples": 64, "per_device_train_batch_size": 16, "max_train_steps": 3, "logging_steps": 1},
        "tasks": ["mrpc"],
        "optimizers": {"adamw": {"learning_rate": 1e-3}, "adaptopt": {"learning_rate": 1e-3}},
        "lr_sweep": {"adamw": [1e-3, 3e-3]},
        # "broken" is a flag value the recipe refuses: both its runs must fail, and the rest go on. The ablation
        # is of adamw here only because its runs are the cheapest (AdaptOpt's is the same code path).
        "ablation": {"optimizer": "adamw",
                     "variants": {"no_clipping": {"max_grad_norm": 0}, "broken": {"max_grad_norm": -1}}},
    }
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = root / "out"
    first = study_cli("--config", config_path, "--output_dir", out, "--jobs", 2, check_code=1)

    killed = out / "runs" / "mrpc-adamw-lr0.001-seed2"
    (killed / "results.json").unlink()
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/results.json")}
    second = study_cli("--config", config_path, "--output_dir", out, "--skip_failed",
                       "--publish", root / "docs" / "study.md", check_code=1)
    return dict(root=root, config=config, config_path=config_path, out=out, first=first, second=second,
                killed=killed, mtimes=mtimes)


def test_study_runs_in_parallel_and_records_failed_runs(tiny_study):
    out = tiny_study["out"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 10  # 4 main + 2 more adamw LRs + 2 x 2 ablation variants
    infos = {name: json.loads((out / "runs" / name / "run.json").read_text()) for name in runs}
    broken = [n for n in runs if "-broken-" in n]
    assert len(broken) == 2
    for name in broken:
        info = infos[name]
        assert info["status"] == "failed" and info["returncode"] == 2  # the recipe's code, through the launcher
        assert "--max_grad_norm must be >= 0" in info["stderr_tail"]
        assert info["error"].startswith("glue.py: error: --max_grad_norm must be >= 0")  # the cause, not accelerate's
        assert not (out / "runs" / name / "results.json").exists()
    for name in set(runs) - set(broken):
        assert infos[name]["status"] == "finished" and (out / "runs" / name / "results.json").is_file()
        if name != tiny_study["killed"].name:  # rerun later with --jobs 1
            assert infos[name]["omp_num_threads"] == max(1, available_cores() // 2)
    assert "mrpc-adamw-broken-lr0.001-seed1 FAILED (exit 2): glue.py: error:" in tiny_study["first"].stdout
    r = json.loads((out / "runs" / "mrpc-adamw-no_clipping-lr0.001-seed1" / "results.json").read_text())
    assert r["optimizer"] == "adamw" and r["seed"] == 1 and r["completed_steps"] == 3
    cmd = infos["mrpc-adamw-no_clipping-lr0.001-seed1"]["command"]
    # the variant's flag comes after the shared one, so it is the one argparse keeps
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--max_grad_norm"] == ["0"]


def test_resume_reruns_only_the_unfinished_run(tiny_study):
    out, killed = tiny_study["out"], tiny_study["killed"]
    assert "running 1," in tiny_study["second"].stdout
    assert (killed / "results.json").is_file() and json.loads((killed / "run.json").read_text())["attempts"] == 2
    for name, mtime in tiny_study["mtimes"].items():  # finished runs were not touched
        assert (out / "runs" / name / "results.json").stat().st_mtime_ns == mtime
        assert json.loads((out / "runs" / name / "run.json").read_text())["attempts"] == 1
    for p in (out / "runs").glob("*-broken-*/run.json"):  # --skip_failed: not retried
        assert json.loads(p.read_text())["attempts"] == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the references warn on constant groups, as scipy does
def test_statistics_equal_scipy_and_statsmodels_on_the_results_files(tiny_study):
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    out = tiny_study["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == dict(total=10, finished=8, failed=2, pending=0)
    task = summary["tasks"]["mrpc"]
    assert task["primary_metric"] == "accuracy"
    assert {"accuracy", "f1", "final_train_loss", "train_time_s"} <= set(task["metrics"])
    main = {opt: results_of(out, f"mrpc-{opt}-lr0.001-seed*") for opt in ("adamw", "adaptopt")}
    assert [len(v) for v in main.values()] == [2, 2]
    tested = 0
    for metric in task["metrics"]:
        groups = {opt: [r[metric] for r in rs] for opt, rs in main.items()}
        row = {g["optimizer"]: g for g in task["optimizers"]}
        for opt, values in groups.items():
            s = row[opt]["stats"][metric]
            assert s["values"] == values and s["mean"] == pytest.approx(np.mean(values))
            assert s["std"] == pytest.approx(np.std(values, ddof=1))
        expected = sps.f_oneway(*groups.values())  # NaN when every run predicts the majority class
        assert_stat(task["anova"][metric]["F"], expected.statistic)
        assert_stat(task["anova"][metric]["p"], expected.pvalue)
        tk = task["tukey"][metric][0]
        ref = pairwise_tukeyhsd(np.array(groups["adamw"] + groups["adaptopt"]), ["adamw"] * 2 + ["adaptopt"] * 2)
        assert (tk["a"], tk["b"]) == ("adamw", "adaptopt")
        assert_stat(tk["p"], ref.pvalues[0])
        if tk["p"] is not None:
            assert tk["p"] == pytest.approx(sps.tukey_hsd(groups["adamw"], groups["adaptopt"]).pvalue[0, 1], rel=1e-6)
            tested += 1
    assert tested >= 2  # train time and loss differ between runs, so at least those were tested

    # verdict: adaptopt at its study LR vs adamw at the swept LR with the best mean accuracy
    adamw = {lr: [r["accuracy"] for r in results_of(out, f"mrpc-adamw-lr{lr}-seed*")] for lr in ("0.001", "0.003")}
    best = max(adamw, key=lambda lr: np.mean(adamw[lr]))
    verdict = task["verdict"]["at_default"]
    assert verdict["baseline_lr"] == float(best)
    cand = [r["accuracy"] for r in main["adaptopt"]]
    assert verdict["diff"] == pytest.approx(np.mean(cand) - np.mean(adamw[best]))
    assert_stat(verdict["welch"]["p"], sps.ttest_ind(cand, adamw[best], equal_var=False).pvalue)
    # and the two at the one LR both ran at, with no LR picked on the dev set
    [same] = task["verdict"]["at_same_lr"]
    assert (same["candidate_lr"], same["baseline_lr"]) == (0.001, 0.001)
    assert same["diff"] == pytest.approx(np.mean(cand) - np.mean(adamw["0.001"]))
    assert_stat(same["welch"]["p"], sps.ttest_ind(cand, adamw["0.001"], equal_var=False).pvalue)

    ablation = {r["variant"]: r for r in task["ablation"]["rows"]}
    assert list(ablation) == [FULL, "no_clipping", "broken"]
    assert (ablation["no_clipping"]["n_finished"], ablation["broken"]["n_finished"], ablation["broken"]["n_failed"]) \
        == (2, 0, 2)
    full = [r["accuracy"] for r in main["adamw"]]
    no_clip = [r["accuracy"] for r in results_of(out, "mrpc-adamw-no_clipping-lr0.001-seed*")]
    assert_stat(ablation["no_clipping"]["welch"]["accuracy"]["p"], sps.ttest_ind(no_clip, full, equal_var=False).pvalue)
    sweep = {r["learning_rate"]: r["n_finished"] for r in task["lr_sensitivity"]["adamw"]}
    assert sweep == {0.001: 2, 0.003: 2}


def test_plots_and_report_are_written(tiny_study):
    out = tiny_study["out"]
    for name in PLOTS:
        data = (out / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    report = (out / "report.md").read_text()
    for needle in ("adamw", "adaptopt", "## Verdict", "Tukey HSD", "## Ablation", "## Failed runs", "broken",
                   f"--config {tiny_study['config_path']}", "plots/loss_curves.png", "matches or beats",
                   "This study is not complete", "Both at the same LR", "peak LR applied"):  # 2 of its runs failed
        assert needle in report, needle
    published = tiny_study["root"] / "docs" / "study.md"  # --publish: the report for docs/, its plots beside it
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", published.read_text())
    assert sorted(Path(link).name for link in links) == sorted(f"{name}.png" for name in PLOTS)
    assert all((published.parent / link).read_bytes().startswith(PNG_SIGNATURE) for link in links)
    # the curves come from train_log.jsonl: 3 logged updates, averaged over the 2 seeds
    curve = json.loads((out / "summary.json").read_text())["tasks"]["mrpc"]["curves"]["adamw"]
    assert curve["step"] == [1, 2, 3] and curve["seeds"] == 2


def test_plots_of_a_partial_study_mark_tasks_without_runs(tiny_study, tmp_path):
    """A study that has run one task of several (as the project's own, run across sessions) still gets
    every plot; the panels of the other tasks say that nothing has run yet."""
    from adaptopt.study.plots import write_plots

    summary = json.loads((tiny_study["out"] / "summary.json").read_text())
    summary["tasks"]["rte"] = dict(primary_metric="accuracy", optimizers=[], lr_sensitivity={}, curves={}, ablation=None)
    written = write_plots(summary, tmp_path)
    assert sorted(written) == sorted(PLOTS)
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in written.values())


def test_lr_sensitivity_names_a_peer_far_below_the_swept_lines_instead_of_stretching_the_axis():
    """STS-B: the swept lines lie within 0.80-0.88 and a failed peer at Pearson 0.02; a dashed line there
    would flatten them, so it is named in a box and a peer near them is still drawn."""
    import matplotlib.pyplot as plt

    from adaptopt.study.plots import _lr_sensitivity

    def stats(mean):
        return {"pearson": dict(n=3, mean=mean, ci95=0.01)}

    task = dict(primary_metric="pearson",
                lr_sensitivity={"adamw": [dict(learning_rate=lr, stats=stats(m))
                                          for lr, m in ((5e-5, 0.84), (1e-4, 0.86), (2e-4, 0.858))]},
                verdict=dict(untuned=[dict(optimizer="prodigy", candidate=dict(mean=0.02, ci95=0.05)),
                                      dict(optimizer="dadapt_adam", candidate=dict(mean=0.83, ci95=0.01))]))
    fig, ax = plt.subplots()
    try:
        assert _lr_sensitivity(task, ax, {"adamw": "C0", "prodigy": "C1", "dadapt_adam": "C2"}, "stsb")
        labels = [line.get_label() for line in ax.get_lines()]
        assert "dadapt_adam (no LR)" in labels and "prodigy (no LR)" not in labels
        assert any("prodigy (no LR): 0.020" in t.get_text() for t in ax.texts)
        assert ax.get_ylim()[0] > 0.5
        assert [t.get_text() for t in ax.get_xticklabels()] == ["5e-5", "1e-4", "2e-4"]
    finally:
        plt.close(fig)
    # one swept point of one seed (no width): a peer near it is still drawn, not boxed
    task["lr_sensitivity"] = {"adamw": [dict(learning_rate=1e-4, stats={"pearson": dict(n=1, mean=0.86, ci95=None)})]}
    fig, ax = plt.subplots()
    try:
        _lr_sensitivity(task, ax, {"adamw": "C0", "prodigy": "C1", "dadapt_adam": "C2"}, "stsb")
        assert "dadapt_adam (no LR)" in [line.get_label() for line in ax.get_lines()]
    finally:
        plt.close(fig)


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for a reaper do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_study_stopped_mid_run_kills_the_run_and_resumes_it(stop, glue_dir, tiny_bert, tmp_path):
    """SIGTERM as a scheduler or `kill` sends it; SIGINT to a study started the way `nohup ... &` in a script
    starts it, with SIGINT ignored, which Python would otherwise keep ignoring."""
    config = {"seeds": [1], "tasks": ["mrpc"], "optimizers": ["adamw"],
              "args": {"data_dir": str(glue_dir), "model_name_or_path": str(tiny_bert), "max_train_samples": 48,
                       "max_eval_samples": 64, "per_device_train_batch_size": 16, "max_train_steps": 3}}
    path, out = tmp_path / "one.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(config))
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if stop == "SIGINT" else None
    study = subprocess.Popen([sys.executable, "-m", "adaptopt.study", "--config", str(path), "--output_dir", str(out)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=ignore_sigint)
    run_json = out / "runs" / "mrpc-adamw-lr5e-05-seed1" / "run.json"
    deadline = time.monotonic() + 120
    while not (run_json.is_file() and "pid" in json.loads(run_json.read_text())):
        assert time.monotonic() < deadline and study.poll() is None, "the run never started"
        time.sleep(0.2)
    study.send_signal(getattr(signal, stop))
    assert study.wait(timeout=60) == 130, study.communicate()
    info = json.loads(run_json.read_text())
    assert info["status"] == "interrupted" and not (run_json.parent / "results.json").exists()
    assert live_processes_in_group(info["pid"]) == []  # launcher and recipe are gone, not orphaned
    if stop == "SIGINT":  # the resume after it is the same as after SIGTERM: one run of it keeps the suite short
        return
    study_cli("--config", path, "--output_dir", out, check_code=0)
    info = json.loads(run_json.read_text())
    assert info["status"] == "finished" and info["attempts"] == 2


def test_an_edited_study_file_does_not_mix_with_old_runs(tiny_study, capsys):
    from adaptopt.study.__main__ import main

    config = dict(tiny_study["config"], args={**tiny_study["config"]["args"], "max_eval_samples": 32})
    edited = tiny_study["root"] / "edited.yaml"
    edited.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["--config", str(edited), "--output_dir", str(tiny_study["out"])]) == 2  # before running anything
    assert "its arguments differ from the study file's" in capsys.readouterr().err


def test_changed_library_defaults_do_not_mix_with_old_runs(tiny_study, capsys, monkeypatch):
    """A run records the optimizer defaults it ran with (run.json) and the hyperparameters it used
    (results.json), so a default changed later in the library refuses the old runs instead of passing
    for them: the study file alone would not show it."""
    from adaptopt import registry
    from adaptopt.study.__main__ import main

    out = tiny_study["out"]
    info = json.loads((out / "runs" / "mrpc-adaptopt-lr0.001-seed1" / "run.json").read_text())
    assert info["optimizer_defaults"]["hypergrad_rate"] == registry.default_hyperparameters("adaptopt")["hypergrad_rate"]
    used = json.loads((out / "runs" / "mrpc-adaptopt-lr0.001-seed1" / "results.json").read_text())
    assert used["optimizer_hyperparameters"]["hypergrad_rate"] == info["optimizer_defaults"]["hypergrad_rate"]
    assert used["optimizer_hyperparameters"]["lr"] == 1e-3 and "lr_scale" not in used["optimizer_hyperparameters"]

    cls, defaults = registry.OPTIMIZERS["adaptopt"]
    monkeypatch.setitem(registry.OPTIMIZERS, "adaptopt", (cls, dict(defaults, hypergrad_rate=0.5)))
    assert main(["--config", str(tiny_study["config_path"]), "--output_dir", str(out), "--report_only"]) == 2
    err = capsys.readouterr().err
    assert "the library's default hypergrad_rate changed since it ran" in err and "mrpc-adaptopt-lr0.001-seed" in err
    assert main(["--config", str(tiny_study["config_path"]), "--output_dir", str(out), "--plan"]) == 0
    assert "warning: " in capsys.readouterr().err  # the plan shows the grid, and says the run would stop


def test_verdict_is_bold_only_with_every_seed_on_both_sides():
    """A study run across sessions publishes partial reports: a yes/no from 1 seed a side must not read as a
    result."""
    from types import SimpleNamespace

    from adaptopt.study import report
    from adaptopt.study.stats import describe

    study = SimpleNamespace(candidate="adaptopt", baseline="adamw", seeds=[1, 2, 3], default_lr=lambda name: 2e-5,
                            peers=[], margin=0.0)

    def verdict_row(cand, base):
        c = dict(candidate=describe(cand), baseline=describe(base), baseline_lr=5e-5,
                 diff=sum(cand) / len(cand) - sum(base) / len(base), welch=None, matches_or_beats=True)
        summary = {"tasks": {"sst2": {"verdict": dict(metric="accuracy", baseline_lrs=[2e-5, 5e-5], at_default=c)}}}
        return next(line for line in report._verdict_section(study, summary) if line.startswith("| sst2"))

    assert verdict_row([0.854], [0.852]).endswith("| yes (preliminary: 1 vs 1 of 3 seeds) |")
    assert verdict_row([0.85, 0.86, 0.855], [0.85, 0.84]).endswith("| yes (preliminary: 3 vs 2 of 3 seeds) |")
    assert verdict_row([0.85, 0.86, 0.855], [0.85, 0.84, 0.845]).endswith("| **yes** |")


def test_untuned_optimizers_are_judged_within_the_margin_and_the_lr_spread_is_reported():
    """The LR-free study's tables: every optimizer run without an LR sweep against the baseline's best (a shortfall
    within compare.margin counts as a match), closest first; and how far each swept optimizer's mean moves."""
    from types import SimpleNamespace

    from adaptopt.study import aggregate, report
    from adaptopt.study.stats import describe

    study = SimpleNamespace(baseline="adamw", peers=["prodigy"], margin=0.005, seeds=[1, 2])

    def row(name, values, diff):
        return dict(optimizer=name, candidate_lr=1.0, baseline_lr=1e-4, candidate=describe(values),
                    baseline=describe([0.86, 0.858]), diff=diff, welch=None, matches_or_beats=diff >= 0,
                    within_margin=diff >= -0.005)

    verdicts = {"mrpc": dict(metric="f1", untuned=[row("prodigy", [0.81, 0.80], -0.054),
                                                   row("adaptopt", [0.857, 0.856], -0.0025)])}
    lines = report._untuned_table(study, verdicts)
    table = [line for line in lines if line.startswith("| mrpc")]
    assert table[0].startswith("| mrpc | adaptopt") and table[0].endswith("| **yes** |")  # 0.25 points short: within
    assert table[1].startswith("| mrpc | prodigy") and table[1].endswith("| **no** |")
    assert "within 0.005 of adamw's best?" in lines[2]

    rows = [dict(learning_rate=lr, stats={"f1": describe(v)}) for lr, v in
            ((1e-6, [0.84, 0.85]), (1e-5, [0.86, 0.862]), (1e-4, [0.861]))]
    spread = aggregate._spread(rows, "f1")  # the 1-seed LR does not compete with the 2-seed ones
    assert spread["lrs"] == [1e-6, 1e-5] and spread["low_lr"] == 1e-6 and spread["high_lr"] == 1e-5
    assert spread["spread"] == pytest.approx(0.861 - 0.845)
    assert aggregate._spread(rows[:1], "f1") is None
