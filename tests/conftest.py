"""Shared fixtures: the real GLUE and SQuAD files, a tiny randomly initialised BERT, and a recipe launcher."""
import os
from pathlib import Path

import pytest

from adaptopt.launch import launcher_args, run_recipe

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The real data (../shared/data), overridable as the benchmarks' --data_dir/--squad_dir are.
GLUE = Path(os.environ.get("GLUE_DIR") or REPO.parent / "shared" / "data" / "glue")
SQUAD = Path(os.environ.get("SQUAD_DIR") or REPO.parent / "shared" / "data" / "squad")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE / "MRPC" / "dev.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {GLUE} (set GLUE_DIR)")
    return GLUE


@pytest.fixture(scope="session")
def squad_dir() -> Path:
    if not (SQUAD / "dev-v1.1-part.json").is_file():
        pytest.skip(f"real SQuAD data not found at {SQUAD} (set SQUAD_DIR)")
    return SQUAD


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the real MiniLM WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptopt.models import default_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(out, safe_serialization=True)  # a body, as a pretrained checkpoint is
    tokenizer.save_pretrained(out)
    return out


def launch(script: str, args: list[str], *, processes: int = 1, timeout: int = 600, env: dict | None = None,
           mixed_precision: str = "no", ds_config: str | None = None, check: bool = True):
    """Runs a recipe through adaptopt.launch, as launch/run.py does for a user, one thread per process (the
    tests run beside each other on few cores); returns the CompletedProcess (output captured).

    ``ds_config``: a file in ds_configs/ (or a path), launched through launch/deepspeed_single_node.yaml.
    """
    launcher = launcher_args(processes=processes, mixed_precision=mixed_precision,
                             deepspeed_config=None if ds_config is None else REPO / "ds_configs" / ds_config,
                             main_process_port=_free_port() if processes > 1 or ds_config else None)
    return run_recipe(launcher, REPO / script, args, threads=1, env=env, timeout=timeout, check=check)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# tests/test_study.py's end-to-end tests run a whole study through accelerate launch (those on its `tiny_study`
# fixture, and the stop-and-resume test): the slow tier. Marked here by what they run, so that the study's test
# file carries only the study's tests; its statistics, config and runner tests stay in the fast tier.
STUDY_END_TO_END = {"test_a_study_stopped_mid_run_kills_the_run_and_resumes_it"}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tiny_study" in getattr(item, "fixturenames", ()) or getattr(item, "originalname", "") in STUDY_END_TO_END:
            item.add_marker(pytest.mark.slow)


def preempt_then_resume(cmd: list[str], out: Path, signal_after: str) -> None:
    """Runs ``cmd`` (a recipe started with python), sends SIGUSR1 (SLURM's warning before preemption) once a
    stderr line contains ``signal_after`` (logged after the recipe installs its handler, before update 1), and
    checks the run checkpointed after update 1, exited 75 and wrote no results; then resumes it with
    ``--resume_from_checkpoint latest`` to the end. The caller compares its results with the uninterrupted run's."""
    import signal
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")  # as launch() runs the uninterrupted run
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if signal_after in line:
            proc.send_signal(signal.SIGUSR1)
            break
    _, rest = proc.communicate(timeout=600)
    assert proc.returncode == 75, "".join(seen)[-3000:] + rest[-3000:]
    assert "stopped for preemption after update 1" in rest
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step_00000001"]
    assert not (out / "results.json").exists()
    resumed = subprocess.run([*cmd, "--resume_from_checkpoint", "latest"], capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
