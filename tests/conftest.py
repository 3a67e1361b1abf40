"""Shared fixtures: the real GLUE and SQuAD files, a tiny randomly initialised BERT, and a recipe launcher."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    """Runs ``accelerate launch`` on a recipe as a user would; returns the CompletedProcess.

    ``ds_config``: a file in ds_configs/, launched through launch/deepspeed_single_node.yaml.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    run_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if ds_config is not None:
        cmd += ["--config_file", str(REPO / "launch" / "deepspeed_single_node.yaml"),
                "--deepspeed_config_file", str(REPO / "ds_configs" / ds_config),
                "--num_processes", str(processes), "--main_process_port", str(_free_port())]
        if mixed_precision != "no":
            cmd += ["--mixed_precision", mixed_precision]
        cmd += [str(REPO / script), *args]
        return _run(cmd, run_env, timeout, check)
    if processes > 1:  # CPU DDP over gloo (ENVIRONMENT.md: --cpu starts only one process)
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(_free_port())]
        run_env["ACCELERATE_USE_CPU"] = "true"
    else:
        cmd += ["--num_processes", "1", "--cpu"]
    cmd += ["--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(REPO / script), *args]
    return _run(cmd, run_env, timeout, check)


def _run(cmd, env, timeout, check):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
