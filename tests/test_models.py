"""adaptopt/models.py's loading options: activation checkpointing gives the same loss and gradients as without it
(full training and LoRA) while keeping fewer activations, what --torch_dtype/--attn_implementation pass to
from_pretrained, and the refusal of an attention kernel this machine cannot run."""
import pytest
import torch

from adaptopt import cli
from adaptopt.lora import apply_lora
from adaptopt.models import enable_activation_checkpointing, load_kwargs
from test_cli import parse  # the recipes' shared flags, parsed and checked as a recipe does


def tiny_llama(**kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kwargs)
    return LlamaForCausalLM(config)


def loss_grads_and_saved_bytes(model, input_ids):
    """The loss, the gradients of every trainable parameter, and the bytes autograd saved for the backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()  # checkpointing only acts in training mode; LLaMA's dropouts are 0, so train mode is deterministic
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_gives_the_same_loss_and_gradients_and_keeps_fewer_activations(lora):
    input_ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    runs = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            enable_activation_checkpointing(model)
        if lora:  # the recipes' order (RecipeRun.training_model): checkpointing, then peft wraps the model
            torch.manual_seed(2)  # the same adapter init in both runs
            model = apply_lora(model, "CAUSAL_LM", r=4, dropout=0.0)
            # LoRA's B starts at zero, which would leave A's gradient zero: give B a value so both carry signal
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(3))
        runs.append(loss_grads_and_saved_bytes(model, input_ids))
    (loss, grads, saved), (loss_ckpt, grads_ckpt, saved_ckpt) = runs
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == (3 * 2 * 4 if lora else len(grads))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads_ckpt.items() if "lora_A" in n or not lora)
    # Each layer keeps its input and not its attention and MLP intermediates: well under half here.
    assert saved_ckpt < 0.5 * saved


def test_checkpointing_turns_the_kv_cache_off_and_refuses_a_model_without_support():
    model = tiny_llama(use_cache=True)
    enable_activation_checkpointing(model)
    assert model.config.use_cache is False and all(layer.gradient_checkpointing for layer in model.model.layers)
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_load_kwargs_pass_only_the_flags_given():
    assert load_kwargs(parse()) == {}
    assert load_kwargs(parse("--torch_dtype", "bfloat16", "--attn_implementation", "eager")) == dict(
        dtype=torch.bfloat16, attn_implementation="eager")
    assert load_kwargs(parse("--torch_dtype", "auto")) == {"dtype": "auto"}


def test_the_loaded_model_has_the_dtype_and_attention_asked_for(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, **load_kwargs(parse("--torch_dtype", "bfloat16", "--attn_implementation", "eager")))
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_flash_attention_without_cuda_is_refused_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--attn_implementation", "flash_attention_2")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--attn_implementation flash_attention_2 needs a CUDA GPU and the flash_attn package" in err
    assert "no CUDA GPU" in err and "Use --attn_implementation sdpa" in err
    assert cli.attn_refusal("sdpa") is None and cli.attn_refusal(None) is None
