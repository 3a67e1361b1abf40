"""LoRA adapters through peft: target modules chosen per architecture, a check that the optimizer
holds only what trains, and merging the adapters into a plain model.

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
    """--lora_target_modules if given, else ours for the model type, else peft's own default for it."""
    if override:
        return override
    if model_type in TARGET_MODULES:
        return TARGET_MODULES[model_type]
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if isinstance(PEFT_DEFAULTS.get(model_type), list):  # (a few peft entries are regexes; not those)
        return PEFT_DEFAULTS[model_type]
    raise ValueError(
        f"no default LoRA target modules for model type {model_type!r}: pass --lora_target_modules "
        f"(module names, e.g. query value); known types: {', '.join(sorted(TARGET_MODULES))} and peft's"
    )


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


def check_optimizer_params(optimizer, model) -> None:
    """Raises unless the optimizer holds exactly the model's trainable parameters: a frozen base weight in
    the optimizer would cost its full state (and weight decay would move it); a missing adapter would not train."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = [n for n, p in model.named_parameters() if id(p) in held and not p.requires_grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if frozen or missing:
        raise RuntimeError(f"optimizer parameters differ from the trainable ones: frozen but in the optimizer "
                           f"{frozen[:5]}, trainable but missing {missing[:5]}")


def merged_model(peft_model, state_dict: dict):
    """A plain transformers model: the base model with the adapters in ``state_dict`` folded into its weights.

    ``state_dict`` is the PeftModel's full state dict as ``accelerator.get_state_dict`` returns it, which
    under ZeRO-3 is gathered from every rank's shards onto rank 0. The merge happens in a fresh copy built
    from the base model's config: the training model's own tensors are ZeRO-3 partitions (empty on
    each rank), and merging in place would change a model the caller may still use."""
    import copy
    from collections import Counter

    from peft import get_peft_model

    base = peft_model.get_base_model()
    fresh = get_peft_model(type(base)(copy.deepcopy(base.config)), copy.deepcopy(peft_model.active_peft_config))
    fresh.load_state_dict(state_dict, strict=True)  # random init above is overwritten here, all of it
    # The precision the base weights were trained in (peft may keep adapters in fp32 beside bf16 weights).
    dtypes = Counter(t.dtype for k, t in state_dict.items() if "lora_" not in k and t.is_floating_point())
    return fresh.merge_and_unload().to(dtypes.most_common(1)[0][0])
