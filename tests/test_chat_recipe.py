"""recipes/clm.py --chat launched for real on a tiny random LLaMA and the conversation files of tests/: the
validation loss counts the assistant's tokens only and equals the saved model's own loss on them; activation
checkpointing changes no loss under DDP (full fine-tuning) and under ZeRO-3 with LoRA, where the model is loaded
partitioned (zero.Init) or whole (zero3_init_flag false) alike; an interrupted run resumes to the uninterrupted
run's result, and a preempted one (SIGUSR1, exit 75) too."""
import json
import sys
from pathlib import Path

import pytest
import torch

from clm_fixtures import tiny_llama  # noqa: F401 (fixture)
from conftest import launch, preempt_then_resume

HERE = Path(__file__).parent
REPO = HERE.parent
TRAIN, VALID = HERE / "chat_train.jsonl", HERE / "chat_valid.jsonl"
BLOCK = 128  # the tiny LLaMA's positions; one training conversation is longer and is skipped


def chat_args(model, out, *extra):
    return ["--chat", "--model_name_or_path", str(model), "--train_file", str(TRAIN), "--validation_file", str(VALID),
            "--block_size", str(BLOCK), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3",
            "--learning_rate", "3e-3", "--optimizer_impl", "eager", "--logging_steps", "1", "--output_dir", str(out),
            *extra]


def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def train_losses(out) -> list[float]:
    return [row["train/loss"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
            if "train/loss" in row]


def own_loss_on_assistant_tokens(model_dir: Path, adapter_dir: Path | None, tokenizer_dir: Path) -> tuple[float, int]:
    """A model's own mean loss (labels=...) over the validation conversations' assistant tokens, with the
    tokenizer (and chat template) the recipe saved in ``tokenizer_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptopt.data.chat import load_conversations

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    _, valid, _ = load_conversations(tokenizer, BLOCK, str(TRAIN), str(VALID))
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for row in valid:
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            loss_sum += float(model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss) * n
            tokens += n
    return loss_sum / tokens, tokens


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3-lora"])
def test_checkpointing_leaves_the_losses_unchanged(tiny_llama, tmp_path, backend):  # noqa: F811
    launch_kw = dict(processes=2, ds_config="zero3.json") if backend == "zero3-lora" else dict(processes=2)
    extra = ["--max_train_steps", "4", "--save_model"] + (["--lora"] if backend == "zero3-lora" else [])
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    # the run without checkpointing also loads the whole model on each rank (accelerate's zero3_init_flag off,
    # as `accelerate launch --zero3_init_flag false` sets it): the two ways of loading must train alike too
    launch("recipes/clm.py", chat_args(tiny_llama, plain, *extra), env={"ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"},
           **launch_kw)
    launch("recipes/clm.py", chat_args(tiny_llama, ckpt, *extra, "--gradient_checkpointing"), **launch_kw)
    a, b = results(plain), results(ckpt)
    assert not a["gradient_checkpointing"] and b["gradient_checkpointing"] and a["num_processes"] == 2
    assert a["task"] == "chat" and a["chat_skipped"] == {
        "train": {"no_assistant_turn": 2, "unknown_role": 1, "too_long": 1},
        "validation": {"no_assistant_turn": 1, "unknown_role": 0, "too_long": 0}}
    losses = train_losses(plain)
    assert len(losses) == 4 and train_losses(ckpt) == pytest.approx(losses, rel=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    # zero.Init under the ZeRO-3 config (launch/deepspeed_single_node.yaml leaves accelerate's default on), and
    # not where the flag is off
    assert not a["loaded_partitioned"] and b["loaded_partitioned"] == (backend == "zero3-lora")
    if backend == "zero3-lora":
        n = a["parameters"]
        assert a["trainable_parameters"] < n and a["memory"]["start"]["parameter_bytes"] < 0.55 * 4 * n
    # the recipe's exact sharded evaluation = the saved model's own loss on the assistant's tokens
    adapter = ckpt / "model" if backend == "zero3-lora" else None
    loss, tokens = own_loss_on_assistant_tokens(tiny_llama if adapter else ckpt / "model", adapter, ckpt / "model")
    assert b["eval_tokens"] == tokens and b["eval_blocks"] == 10
    assert b["eval_loss"] == pytest.approx(loss, abs=1e-5)
    untrained, _ = own_loss_on_assistant_tokens(tiny_llama, None, ckpt / "model")
    assert abs(untrained - loss) > 1e-3  # the updates changed the model: equal losses are not those of a no-op


@pytest.mark.slow
def test_an_interrupted_chat_run_resumes_to_the_same_result(tiny_llama, tmp_path):  # noqa: F811
    full, part = tmp_path / "full", tmp_path / "part"
    launch("recipes/clm.py", chat_args(tiny_llama, full, "--max_train_steps", "6"))
    launch("recipes/clm.py", chat_args(tiny_llama, part, "--max_train_steps", "6", "--checkpointing_steps", "3"))
    # stand-in for an interruption after update 3: drop what came later, keep the checkpoint of update 3
    (part / "results.json").unlink()
    launch("recipes/clm.py", chat_args(tiny_llama, part, "--max_train_steps", "6",
                                       "--resume_from_checkpoint", str(part / "checkpoints" / "step_00000003")))
    a, b = results(full), results(part)
    assert b["resumed_from"] and b["completed_steps"] == 6
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_preempted_chat_run_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path):  # noqa: F811
    """SIGUSR1 (SLURM's warning before preemption) once the run has started: it checkpoints after update 1 and
    exits 75; resumed with --resume_from_checkpoint latest, it ends where the uninterrupted run ended."""
    full, out = tmp_path / "full", tmp_path / "preempted"
    launch("recipes/clm.py", chat_args(tiny_llama, full, "--max_train_steps", "4"))
    cmd = [sys.executable, str(REPO / "recipes" / "clm.py"), *chat_args(tiny_llama, out, "--max_train_steps", "4")]
    preempt_then_resume(cmd, out, signal_after="parameters: ")  # logged after the handler, before update 1
    a, b = results(full), results(out)
    assert b["resumed_from"].endswith("step_00000001") and b["completed_steps"] == 4
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
