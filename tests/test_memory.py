"""adaptopt/memory.py: the memory report's figures equal the tensors a training step really holds."""
import os

import pytest
import torch

from adaptopt import build_optimizer
from adaptopt import memory
from adaptopt.memory import MemoryTracker, PrivatePeak, format_report, private_memory_mb, tensor_bytes


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


@pytest.mark.skipif(private_memory_mb() is None, reason="needs Linux's /proc/self/status")
def test_private_peak_sees_a_freed_allocation_and_not_a_mapped_file(tmp_path):
    """The load figures of results.json: a 64 MiB tensor allocated and freed inside the window raises the private
    peak by about its size; reading a 64 MiB file through a memory map (page cache, as safetensors loads) does not."""
    import mmap
    import time

    big = tmp_path / "weights.bin"
    big.write_bytes(b"\1" * (64 << 20))
    with PrivatePeak(interval=0.001) as peak:
        with open(big, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # touch every page
            time.sleep(0.05)
        mapped_peak = peak.peak_mb
        t = torch.ones(16 << 20)  # 64 MiB, held for many sampling intervals, then freed
        time.sleep(0.05)
        del t
    assert mapped_peak - peak.start_mb < 16
    assert peak.peak_mb - peak.start_mb > 56


_HOLES = """
import json, torch
from adaptopt.memory import freed_memory_returned, private_memory_mb
def holes():
    first = torch.ones(30 << 18)  # 30 MiB freed: glibc's dynamic rule raises its mapping threshold to 30 MiB
    del first
    keep = []
    for mib in range(2, 21):  # growing temporaries, each followed by a small survivor: a freed one never fits again
        t = torch.ones(mib << 18)
        keep.append(torch.ones(1 << 14))
        del t
    return keep
kept, survivors = {}, []
start = private_memory_mb()
survivors.append(holes())  # glibc's default first: the first mallopt ends its dynamic rule for the process
kept["default"] = private_memory_mb() - start
start = private_memory_mb()
with freed_memory_returned():
    survivors.append(holes())
kept["returned"] = private_memory_mb() - start
print(json.dumps(kept))
"""


@pytest.mark.skipif(private_memory_mb() is None or memory._glibc() is None, reason="needs Linux and glibc")
def test_freed_memory_returned_gives_a_loads_temporaries_back(tmp_path):
    """What model_loading relies on: a pattern of freed temporaries that glibc's default keeps resident (each in a
    heap hole no later one fits) leaves nothing behind inside freed_memory_returned. In a fresh process, since
    the first mallopt call ends glibc's dynamic threshold for the whole process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "holes.py"
    script.write_text(_HOLES)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    kept = json.loads(subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                     check=True).stdout.splitlines()[-1])
    assert kept["default"] > 16, kept  # the pattern really leaves memory behind without it
    assert kept["returned"] < 4, kept
