"""adaptopt/memory.py: the memory report's figures equal the tensors a training step really holds."""
import torch

from adaptopt import build_optimizer
from adaptopt.memory import MemoryTracker, format_report, tensor_bytes


def model_with_a_frozen_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model[0].requires_grad_(False)  # as LoRA freezes the base weights
    return model


def step(model, optimizer):
    loss = model(torch.randn(4, 32)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()  # frees the gradients: the tracker noted them before the step


def test_report_counts_state_and_gradients_of_trainable_parameters_only():
    model = model_with_a_frozen_layer()
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    tracker = MemoryTracker(model, optimizer)
    before = tracker.report()
    trainable = 64 * 8 + 8
    assert before["parameters"] == 32 * 64 + 64 + trainable and before["trainable_parameters"] == trainable
    assert before["parameter_bytes"] == 4 * before["parameters"]
    assert before["optimizer_state_bytes"] == before["gradient_bytes"] == 0  # state is created by the first step
    step(model, optimizer)
    after = tracker.report()
    # torch AdamW: exp_avg and exp_avg_sq per trainable tensor (fp32) plus a 4-byte step tensor per tensor
    assert after["optimizer_state_bytes"] == 2 * 4 * trainable + 2 * 4
    assert after["gradient_bytes"] == 4 * trainable
    assert after["peak_memory_mb"] > 0 and "trainable" in format_report(after)
    tracker.close()


def test_adaptopt_state_is_measured_from_its_tensors():
    model = model_with_a_frozen_layer()
    optimizer = build_optimizer("adaptopt", model, lr=1e-3, compiled=False)
    tracker = MemoryTracker(model, optimizer)
    step(model, optimizer)
    step(model, optimizer)
    expected = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
    assert tracker.report()["optimizer_state_bytes"] == expected >= 3 * 4 * (64 * 8 + 8)  # exp_avg, exp_avg_sq, x0


def test_views_of_one_storage_count_once():
    buffer = torch.zeros(100)
    assert tensor_bytes([buffer[:50], buffer[50:], buffer]) == 400
    assert tensor_bytes([torch.zeros(10), torch.zeros(10, dtype=torch.float64)]) == 40 + 80
