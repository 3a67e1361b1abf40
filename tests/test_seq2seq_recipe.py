"""recipes/seq2seq.py launched for real (accelerate launch: 1 and 2 processes, DeepSpeed ZeRO-3; a plain process
for preemption) on a tiny random T5 and the real GLUE files: generated answers scored as GLUE scores them, invalid
answers counted, a task learnt in a few dozen updates, evaluation that does not depend on the number of processes
or on ZeRO-3's sharding, exact resume after a preemption, LoRA adapters and their merged model, bad input."""
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch, preempt_then_resume
from seq2seq_fixtures import domain_pairs, tiny_t5  # noqa: F401 (fixtures)

sys.path.insert(0, str(REPO / "recipes"))
import seq2seq as seq2seq_recipe  # noqa: E402

MRPC_STEPS = 8


# AdaptOpt's eager update: the same math as the compiled one, without its start-up cost in every launch
EAGER = ["--optimizer_impl", "eager"]


def mrpc_args(glue_dir, model, out, *extra):
    # 8 updates at 2e-3 leave the tiny model between formats: it answers "equivalent", nothing, or a label
    # followed by more words, so answers of several lengths (and invalid ones) come out of one evaluation.
    return ["--task_name", "mrpc", "--data_dir", str(glue_dir), "--model_name_or_path", str(model),
            "--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "101",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "8", "--learning_rate", "2e-3",
            "--logging_steps", "1", *EAGER, *extra]


FULL_RUN = ["--max_train_steps", str(MRPC_STEPS), "--eval_steps", "4", "--checkpointing_steps", "4"]
# Evaluate a saved model as it is: one update at learning rate 0 leaves every weight where it was.
FROZEN = ["--optimizer", "adamw", "--learning_rate", "0", "--max_train_steps", "1"]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def predictions(out: Path, split: str = "validation") -> list[dict]:
    return [json.loads(line) for line in (out / f"predictions_{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mrpc_run(glue_dir, tiny_t5, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mrpc") / "run"
    launch("recipes/seq2seq.py", mrpc_args(glue_dir, tiny_t5, out, *FULL_RUN, "--save_model"))
    return out


@pytest.mark.slow
def test_glue_answers_are_generated_scored_and_invalid_ones_counted(mrpc_run, tiny_t5):
    from transformers import AutoTokenizer

    from adaptopt.data.text2text import round_trip

    r = results(mrpc_run)
    assert r["task"] == "mrpc" and r["completed_steps"] == MRPC_STEPS and r["eval_samples"] == {"validation": 101}
    # greedy, at most as many tokens as the longest label: [CLS] not _ equivalent [SEP]
    assert r["num_beams"] == 1 and r["generation_max_length"] == 5
    rows = predictions(mrpc_run)
    assert [row["idx"] for row in rows] == list(range(101))
    # The figures again from the predictions file, with the tokenizer's own view of the labels
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    labels = {round_trip(tokenizer, w) for w in ("equivalent", "not_equivalent")}
    valid = [row["prediction"] in labels for row in rows]
    assert [row["valid"] for row in rows] == valid
    assert r["invalid_answers"] == valid.count(False) > 0  # part of this barely trained model's answers
    correct = sum(row["prediction"] == round_trip(tokenizer, row["target"]) for row in rows)
    assert r["accuracy"] == correct / 101 and 0 <= r["f1"] <= 1
    assert len({len(row["prediction"]) for row in rows}) >= 2  # answers of several lengths (see mrpc_args)

    log = [json.loads(line) for line in (mrpc_run / "train_log.jsonl").read_text().splitlines()]
    evals = [row for row in log if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [4, 8] and evals[-1]["eval/invalid_answers"] == r["invalid_answers"]
    assert sorted(p.name for p in (mrpc_run / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    assert (mrpc_run / "model" / "model.safetensors").is_file() and (mrpc_run / "model" / "tokenizer.json").is_file()
    end = r["memory"]["end"]
    assert end["parameters"] == r["parameters"] == r["trainable_parameters"]
    assert end["gradient_bytes"] == 4 * r["parameters"] and r["train_samples_per_second"] > 0


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(mrpc_run, glue_dir, tmp_path):
    """The saved model evaluated by 1 and by 2 processes: 101 examples in batches of 8 leave rank 1's last batch
    padded with a duplicate that must not count, and the ranks' answers (of different lengths) are padded to one
    width to be gathered. Both give the training run's own final answers, one for one."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch("recipes/seq2seq.py", mrpc_args(glue_dir, mrpc_run / "model", one, *FROZEN))
    launch("recipes/seq2seq.py", mrpc_args(glue_dir, mrpc_run / "model", two, *FROZEN), processes=2)
    assert results(two)["num_processes"] == 2
    assert predictions(one) == predictions(two) == predictions(mrpc_run)
    for key in ("accuracy", "f1", "invalid_answers"):
        assert results(one)[key] == results(two)[key] == results(mrpc_run)[key], key


@pytest.mark.slow
def test_zero3_generates_on_every_rank_and_equals_one_process(mrpc_run, glue_dir, tmp_path):
    """Under ZeRO-3 each rank holds a shard of every weight, so each generation step is a collective: a rank
    whose answers ended must keep stepping while the other's go on (synced_gpus), or both hang. One example per
    rank and batch makes that happen (answers end after 1 to 5 tokens); the answers are the one-process ones."""
    out = tmp_path / "zero3"
    launch("recipes/seq2seq.py", mrpc_args(glue_dir, mrpc_run / "model", out, *FROZEN,
                                           "--per_device_eval_batch_size", "1"), processes=2, ds_config="zero3.json")
    r = results(out)
    assert r["num_processes"] == 2 and r["completed_steps"] == 1
    assert predictions(out) == predictions(mrpc_run)
    for key in ("accuracy", "f1", "invalid_answers"):
        assert r[key] == results(mrpc_run)[key], key


@pytest.mark.slow
def test_a_preempted_run_resumes_to_the_uninterrupted_result(mrpc_run, glue_dir, tiny_t5, tmp_path):
    """SIGUSR1 (SLURM's warning before preemption) once the run has started: it checkpoints after update 1 and
    exits 75; resumed with --resume_from_checkpoint latest, it ends where the uninterrupted run ended, to the bit."""
    out = tmp_path / "preempted"
    cmd = [sys.executable, str(REPO / "recipes" / "seq2seq.py"), *mrpc_args(glue_dir, tiny_t5, out, *FULL_RUN)]
    preempt_then_resume(cmd, out, signal_after="model: ")  # logged after the handler is installed
    a, b = results(mrpc_run), results(out)
    assert b["resumed_from"].endswith("step_00000001") and b["completed_steps"] == MRPC_STEPS
    for key in ("accuracy", "f1", "invalid_answers", "train_loss"):
        assert a[key] == b[key], key
    assert predictions(out) == predictions(mrpc_run)


@pytest.mark.slow
def test_pairs_learn_a_task_in_a_few_dozen_updates(domain_pairs, tiny_t5, tmp_path):
    """Movie review or news? (tests/seq2seq_fixtures.py) From random weights, 100 updates take the exact match of
    the generated answer from chance (half the pairs are of each kind) to over 70%. AdamW, so that the check
    does not move with AdaptOpt's defaults."""
    train, valid = domain_pairs
    out = tmp_path / "domain"
    launch("recipes/seq2seq.py", ["--model_name_or_path", str(tiny_t5), "--train_file", str(train),
                                  "--validation_file", str(valid), "--output_dir", str(out), "--optimizer", "adamw",
                                  "--learning_rate", "5e-3", "--max_train_steps", "100", "--eval_steps", "40",
                                  "--logging_steps", "10", "--generation_max_length", "4", *EAGER])
    r = results(out)
    assert r["task"] == "text2text" and r["completed_steps"] == 100 and r["eval_samples"] == {"validation": 200}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [row["eval/exact_match"] for row in log if "eval/exact_match" in row]
    assert len(evals) == 3 and evals[0] < 60 and evals[-1] == r["exact_match"] > 70, evals  # updates 40, 80, 100
    rows = predictions(out)
    assert r["exact_match"] == 100 * sum(row["prediction"] == row["target"] for row in rows) / 200
    assert {row["prediction"] for row in rows} == {"movie", "news"}


@pytest.mark.slow
def test_lora_on_stsb_trains_adapters_and_the_merged_model_answers_the_same(glue_dir, tiny_t5, tmp_path):
    """LoRA on T5's q/k/v/o in every attention block, on STS-B (answers are score strings), with beam search.
    The merged model, a plain T5 loaded in this process, generates the answers the run reported."""
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from adaptopt.data.glue import load_glue
    from adaptopt.data.text2text import glue_as_text2text

    out = tmp_path / "lora"
    args = mrpc_args(glue_dir, tiny_t5, out, "--max_train_steps", "3", "--learning_rate", "3e-3", "--lora",
                     "--lora_r", "4", "--save_model", "--merge_lora", "--num_beams", "2")
    args[1] = "stsb"
    launch("recipes/seq2seq.py", args)
    r = results(out)
    assert {"pearson", "spearmanr", "invalid_answers"} <= set(r) and "accuracy" not in r and r["num_beams"] == 2
    # 2 encoder blocks (self-attention) + 2 decoder blocks (self- and cross-attention): 6 x 4 projections 64 -> 64
    assert r["trainable_parameters"] == 6 * 4 * (4 * 64 + 64 * 4)
    assert (out / "model" / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out / "model_merged")
    sources = glue_as_text2text("stsb", load_glue("stsb", data_dir=glue_dir))["validation"]["source"][:8]
    batch = tokenizer(list(sources), padding=True, truncation=True, max_length=512, return_token_type_ids=False,
                      return_tensors="pt")  # the recipe's first evaluation batch, padded as it was

    def answers(model_dir):
        model = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
        with torch.no_grad():
            tokens = model.generate(**batch, num_beams=2, do_sample=False, max_new_tokens=r["generation_max_length"])
        return tokenizer.batch_decode(tokens, skip_special_tokens=True)

    reported = [p["prediction"] for p in predictions(out)[:8]]
    assert answers(out / "model_merged") == reported
    assert answers(tiny_t5) != reported  # the adapters changed the answers, so the equality above means something


@pytest.mark.slow
def test_mnli_reports_both_dev_splits(glue_dir, tiny_t5, tmp_path):
    """MNLI's matched and mismatched dev sets are scored apart. No MNLI ships here: a folder in its layout holds
    real RTE pairs (as MNLI's entailment / contradiction) and "neutral" for a third of them."""
    from adaptopt.data.glue import load_glue

    rte = load_glue("rte", data_dir=glue_dir)["train"]
    rows = [f"{i}\t{a}\t{b}\t{['entailment', 'contradiction'][label] if i % 3 else 'neutral'}"
            for i, (a, b, label) in enumerate(zip(rte["sentence1"][:60], rte["sentence2"][:60], rte["label"][:60]))]
    root = tmp_path / "glue"
    (root / "MNLI").mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tgold_label"
    for name, part in (("train.tsv", rows[:32]), ("dev_matched.tsv", rows[32:45]), ("dev_mismatched.tsv", rows[45:])):
        (root / "MNLI" / name).write_text("\n".join([header, *part]) + "\n")
    out = tmp_path / "mnli"
    args = mrpc_args(root, tiny_t5, out, "--max_train_steps", "2", "--max_eval_samples", "20")
    args[1] = "mnli"
    launch("recipes/seq2seq.py", args)
    r = results(out)
    assert r["eval_samples"] == {"validation_matched": 13, "validation_mismatched": 15}
    for split, n in r["eval_samples"].items():
        assert {f"{split}_{k}" for k in ("accuracy", "f1", "invalid_answers")} <= set(r)
        assert len(predictions(out, split)) == n
        assert predictions(out, split)[0]["target"] in ("entailment", "neutral", "contradiction")


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        seq2seq_recipe.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown_task", "empty_target", "no_data", "glue_dir_without_task", "no_model",
                                  "not_encoder_decoder", "missing_model", "prefix_with_task", "no_train_split",
                                  "bad_beams"])
def test_bad_input_stops_before_training_with_a_clear_message(case, glue_dir, tiny_t5, tiny_bert, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    out = ["--output_dir", str(tmp_path / "out")]
    base = [*out, "--model_name_or_path", str(tiny_t5)]
    glue = ["--data_dir", str(glue_dir), *base]
    if case == "unknown_task":
        assert "invalid choice: 'mrcp'" in _fails(["--task_name", "mrcp", *glue], capsys)
    elif case == "empty_target":
        train = tmp_path / "train.jsonl"
        train.write_text('{"source": "a", "target": "b"}\n{"source": "c", "target": ""}\n')
        err = _fails(["--train_file", str(train), "--validation_file", str(train), *base], capsys)
        assert "train.jsonl line 2: empty target" in err
    elif case == "no_data":
        assert "no data: pass --task_name" in _fails(base, capsys)
    elif case == "glue_dir_without_task":
        assert "--data_dir: GLUE data, which needs --task_name" in _fails(glue, capsys)
    elif case == "no_model":
        assert "--model_name_or_path is required" in _fails(["--task_name", "rte", "--data_dir", str(glue_dir), *out],
                                                           capsys)
    elif case == "not_encoder_decoder":
        err = _fails(["--task_name", "rte", "--data_dir", str(glue_dir), *out, "--model_name_or_path",
                      str(tiny_bert)], capsys)
        assert "is a bert model, not an encoder-decoder" in err and "recipes/clm.py" in err
    elif case == "missing_model":
        err = _fails(["--task_name", "rte", "--data_dir", str(glue_dir), *out, "--model_name_or_path",
                      str(tmp_path / "no-model")], capsys)
        assert "does not exist" in err
    elif case == "prefix_with_task":
        err = _fails(["--task_name", "rte", "--source_prefix", "rte: ", *glue], capsys)
        assert "--source_prefix is for --train_file pairs" in err
    elif case == "no_train_split":
        assert "no training split" in _fails(["--task_name", "qnli", *glue], capsys)
    elif case == "bad_beams":
        assert "--num_beams must be >= 1 (got 0)" in _fails(["--task_name", "rte", "--num_beams", "0", *glue], capsys)
