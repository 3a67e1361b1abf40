"""adaptopt/lora.py: per-architecture target modules, the optimizer-holds-only-trainable check, and the
merged model (its outputs equal the adapter model's)."""
import pytest
import torch

from adaptopt import build_optimizer
from adaptopt.lora import apply_lora, check_optimizer_params, merged_model, target_modules_for


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=2, n_head=2, n_embd=32, n_positions=32))


def test_target_modules_ours_then_peft_then_a_clear_error():
    assert target_modules_for("llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert target_modules_for("gpt_neox") == ["query_key_value"]  # peft's default for a type we do not list
    assert target_modules_for("llama", ["q_proj"]) == ["q_proj"]
    with pytest.raises(ValueError, match="no default LoRA target modules for model type 'mystery'"):
        target_modules_for("mystery")


def test_the_optimizer_holds_exactly_the_adapters():
    model = apply_lora(tiny_gpt2(), "CAUSAL_LM", r=2)
    optimizer = build_optimizer("adaptopt", model, lr=1e-3)
    check_optimizer_params(optimizer, model)  # the registry passes trainable parameters only
    held = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert held == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (2 * 32 + 96 * 2)
    with pytest.raises(RuntimeError, match="frozen but in the optimizer"):
        check_optimizer_params(torch.optim.SGD(model.parameters(), lr=0.1), model)
    adapters = [p for n, p in model.named_parameters() if "lora_A" in n]
    with pytest.raises(RuntimeError, match="trainable but missing"):
        check_optimizer_params(torch.optim.SGD(adapters, lr=0.1), model)


def test_merged_model_gives_the_adapter_models_outputs():
    model = apply_lora(tiny_gpt2(), "CAUSAL_LM", r=4, dropout=0.0)
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            unadapted = base(input_ids=ids).logits
        merged = merged_model(model, model.state_dict()).eval()
        got = merged(input_ids=ids).logits
    assert type(merged).__name__ == "GPT2LMHeadModel" and not any("lora" in n for n, _ in merged.named_parameters())
    assert (expected - unadapted).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert any("lora_B" in n for n, _ in model.named_parameters())  # the training model is left as it was
