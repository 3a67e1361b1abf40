"""Fixtures for the causal-LM tests: real text (SQuAD paragraphs), tiny random GPT-2 and LLaMA checkpoints,
and an evaluation of a saved model in a fresh process.

Run as a script, this file is that fresh process: it loads saved models (each optionally with a LoRA
adapter folder, through peft's PeftModel.from_pretrained) and prints their validation losses as JSON,
computed with the models' own loss (labels=...), not with the recipe's code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SQUAD
TRAIN_PARAGRAPHS, VALID_PARAGRAPHS = 160, 30  # slices of the real text: a few hundred 64-token blocks


def squad_paragraphs(name: str) -> list[str]:
    data = json.loads((SQUAD / name).read_text())["data"]
    return [p["context"] for article in data for p in article["paragraphs"]]


def write_text_files(out: Path) -> tuple[Path, Path]:
    """Training paragraphs from squad/test-v1.1-part.json as jsonl, validation paragraphs from the
    disjoint articles of dev-v1.1-part.json as a .txt (a paragraph per line): both formats in one run."""
    out.mkdir(parents=True, exist_ok=True)
    train, valid = out / "train.jsonl", out / "valid.txt"
    train_texts = squad_paragraphs("test-v1.1-part.json")[:TRAIN_PARAGRAPHS]
    valid_texts = squad_paragraphs("dev-v1.1-part.json")[:VALID_PARAGRAPHS]
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts))
    valid.write_text("".join(" ".join(t.split()) + "\n" for t in valid_texts))
    return train, valid


def save_tiny_model(out: Path, model_type: str) -> Path:
    """A 2-layer, 64-wide model with random weights and the MiniLM WordPiece tokenizer, saved as a
    pretrained checkpoint is (the recipe's LoRA runs need base weights that a reload can find)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from adaptopt.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    shape = (dict(n_layer=2, n_head=2, n_embd=64, n_positions=128) if model_type == "gpt2" else
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128))
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.cls_token_id,
                                  eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> tuple[Path, Path]:
    if not (SQUAD / "dev-v1.1-part.json").is_file():
        pytest.skip(f"real SQuAD data not found at {SQUAD} (set SQUAD_DIR)")
    return write_text_files(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def eval_losses_in_fresh_process(models: list[tuple[Path, Path | None]], validation_file: Path, block_size: int,
                                 max_blocks: int | None = None) -> list[dict]:
    """Validation loss of each (model folder, adapter folder or None), all in one new Python process."""
    specs = json.dumps([{"model": str(m), "adapter": str(a) if a else None} for m, a in models])
    cmd = [sys.executable, __file__, "--models", specs, "--validation_file", str(validation_file),
           "--block_size", str(block_size)] + (["--max_blocks", str(max_blocks)] if max_blocks else [])
    # this file imports conftest, which imports adaptopt: the checkout's, installed or not
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    import argparse

    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasets import Dataset

    from adaptopt.data.text import pack, read_texts

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help='JSON: [{"model": folder, "adapter": folder or null}, ...]')
    parser.add_argument("--validation_file", required=True)
    parser.add_argument("--block_size", type=int, required=True)
    parser.add_argument("--max_blocks", type=int, default=None)
    args = parser.parse_args()
    out = []
    for spec in json.loads(args.models):
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        model = AutoModelForCausalLM.from_pretrained(spec["model"])
        if spec["adapter"]:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec["adapter"])
        model.eval()
        blocks = pack(Dataset.from_dict({"text": read_texts(args.validation_file)}), tokenizer, args.block_size)
        if args.max_blocks:
            blocks = blocks.select(range(args.max_blocks))
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for row in blocks:
                ids = torch.tensor([row["input_ids"]])
                loss_sum += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)  # a mean over block-1
                tokens += ids.shape[1] - 1
        out.append({"eval_loss": loss_sum / tokens, "eval_blocks": len(blocks), "model_class": type(model).__name__})
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
