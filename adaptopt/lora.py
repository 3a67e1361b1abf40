"""LoRA adapters through peft, with target modules chosen per architecture.

Only the adapters (and the task head, which is new and must train) are trainable, so the optimizer,
built from trainable parameters only, keeps state for a small fraction of the model.
"""
from __future__ import annotations

# Attention projections per model family (peft's own defaults for these model types agree).
TARGET_MODULES = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "t5": ["q", "k", "v", "o"],
}
# Heads that a task adds on top of the pretrained body: new weights, trained fully.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"], "CAUSAL_LM": []}


def target_modules_for(model_type: str, override: list[str] | None = None) -> list[str]:
    if override:
        return override
    if model_type not in TARGET_MODULES:
        raise ValueError(
            f"no default LoRA target modules for model type {model_type!r}: pass --lora_target_modules "
            f"(module names, e.g. query value); known types: {', '.join(sorted(TARGET_MODULES))}"
        )
    return TARGET_MODULES[model_type]


def apply_lora(model, task_type: str, *, r: int = 8, alpha: int = 16, dropout: float = 0.1,
               target_modules: list[str] | None = None):
    """Wraps ``model`` with LoRA adapters (peft); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules_for(model.config.model_type, target_modules),
        modules_to_save=[m for m in TASK_HEADS.get(task_type, []) if _has_module(model, m)] or None,
    )
    return get_peft_model(model, config)


def _has_module(model, name: str) -> bool:
    return any(n.split(".")[-1] == name for n, _ in model.named_modules())
