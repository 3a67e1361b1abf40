"""Mean pooling for BERT-family sequence classifiers (``--classifier_pooling mean`` in recipes/glue.py).

Why: ``BertForSequenceClassification`` classifies from the pooler, a dense+tanh layer over the [CLS]
token. The recipes' default model, all-MiniLM-L6-v2, was trained as a sentence encoder by the *mean*
of its token states over the attention mask; its [CLS] state and its pooler were never trained for
that (the shipped pooler bias is exactly zero). Mean pooling hands the classifier the representation
the checkpoint was actually trained to produce, which matters most on small GLUE training sets.

How: the base model's pooler is replaced by a parameter-free masked mean, so the classifier reads
``dropout(mean)`` where it read ``dropout(tanh(W h_cls + b))``; the pooler's weights are dropped. The
mask reaches the pooler through a forward pre-hook on the base model (BertModel's pooler is called with
the hidden states only). The choice is written into the model's config as ``classifier_pooling`` (the
name transformers' ModernBERT uses for the same switch), so that the recipe applies it again when it
loads an exported model. A plain ``AutoModelForSequenceClassification.from_pretrained`` of such an
export would warn that the pooler weights are missing and classify from [CLS]: load it through
``apply_classifier_pooling`` instead.
"""
from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("cls", "mean")


class PoolingError(ValueError):
    """A pooling the model cannot do; the message says what to pass instead."""


class MaskedMeanPooler(nn.Module):
    """Mean of the hidden states over the non-padding tokens ([CLS] and [SEP] included, as
    sentence-transformers pools)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None  # set by the base model's pre-hook on every forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 3:
            raise ValueError(f"mean pooling needs (batch, tokens, hidden) states, got shape {tuple(hidden_states.shape)}")
        mask = self.attention_mask
        if mask is None:  # called without a padding mask: every token counts, as in the model itself
            mask = hidden_states.new_ones(hidden_states.shape[:2])
        elif mask.shape != hidden_states.shape[:2]:  # e.g. a 4-D attention bias: no per-token mask to average by
            raise ValueError(f"mean pooling needs a (batch, tokens) attention mask, got shape {tuple(mask.shape)}")
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _remember_mask(pooler: MaskedMeanPooler):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:  # BertModel.forward(input_ids, attention_mask, ...)
            mask = args[1]
        pooler.attention_mask = mask

    return hook


def apply_classifier_pooling(model, pooling: str | None):
    """Sets the classifier's pooling; ``None`` keeps what the model's config says (``cls`` if nothing).

    Raises PoolingError for an unknown pooling, or for mean pooling on a model without a replaceable
    pooler (e.g. RoBERTa's head reads [CLS] itself): the message says which models are supported."""
    pooling = pooling or getattr(model.config, "classifier_pooling", None) or "cls"
    if pooling not in POOLINGS:
        raise PoolingError(f"classifier pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling == "mean":
        _use_mean_pooling(model)
    # The config is the one record of the choice: an export says how it classifies, and an explicit cls over
    # a mean export is written back as cls (its pooler then starts fresh; transformers warns).
    model.config.classifier_pooling = pooling
    return model


def _use_mean_pooling(model) -> None:
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    # A BertPooler-style module is called with the whole sequence (B, T, H); ALBERT's plain Linear pooler
    # is called with the [CLS] state only, and RoBERTa's head reads [CLS] itself: neither can be swapped.
    if base is None or not type(getattr(base, "pooler", None)).__name__.endswith("Pooler"):
        raise PoolingError(
            f"--classifier_pooling mean needs a BERT-style model whose base model has a `...Pooler` module "
            f"called on the whole sequence (BERT, MiniLM, all-MiniLM-L6-v2); {type(model).__name__} has none. "
            "Use --classifier_pooling cls for this model."
        )
    pooler = MaskedMeanPooler()
    base.pooler = pooler
    base.register_forward_pre_hook(_remember_mask(pooler), with_kwargs=True)
