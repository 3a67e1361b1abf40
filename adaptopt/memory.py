"""What a training run holds in memory, read from the live tensors: the report every recipe logs at the
start and end of training and writes into results.json as ``memory``.

Fields (bytes unless named otherwise; all per process, i.e. per rank under DDP or DeepSpeed):

* ``parameters`` / ``trainable_parameters``: element counts of the whole model (under ZeRO-3, where a
  rank holds only a partition, the full counts DeepSpeed records as ``ds_numel``);
* ``parameter_bytes``: the model's parameters this rank holds (its partition under ZeRO-3);
* ``optimizer_state_bytes``: every tensor in the torch optimizer's ``state`` (Adam's exp_avg, exp_avg_sq,
  step counters; AdaptOpt's Mechanic start x0...), each storage counted once. Under DeepSpeed ZeRO-1/2/3 the optimizer's parameters
  are DeepSpeed's flat fp32 partitions, so this is the rank's share. Optimizers create state on their
  first step: it is 0 at the start;
* ``gradient_bytes``: the ``.grad`` of the tensors the optimizer updated at its last step (read by a
  step pre-hook, because gradients are freed right after the step): the full gradients without ZeRO,
  the rank's flat fp32 gradient partition under ZeRO-1/2/3. 0 before the first step;
* ``peak_memory_mb``: the process's peak resident memory (``ru_maxrss``) on CPU, or the peak memory torch
  allocated on the GPU (``torch.cuda.max_memory_allocated``). Resident memory counts the pages of a
  memory-mapped checkpoint the process has read: page cache, shared between the processes that map the file and
  reclaimable by the kernel, so it overstates what a load needs of its own; :class:`PrivatePeak` measures that.

With LoRA the optimizer holds only the adapters, so optimizer state and gradients shrink with the
trainable fraction (benchmarks/lora_memory.py measures it on a 124M-parameter GPT-2).
"""
from __future__ import annotations

import ctypes
import resource
import threading
from contextlib import contextmanager

import torch


def peak_memory_mb(device=None) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def private_memory_mb() -> float | None:
    """The process's private resident memory now (``RssAnon``: heap and anonymous mappings, not the page
    cache of mapped files), or None where /proc does not say (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return None


class PrivatePeak:
    """Peak private resident memory (:func:`private_memory_mb`) over a stretch of code, sampled every
    ``interval`` seconds by a daemon thread, since Linux keeps a high-water mark only for the whole resident
    set (``VmHWM``, which includes a mapped checkpoint's page cache). A spike shorter than the interval can be
    missed; loading a model allocates tensors that live for many intervals.

    ``with PrivatePeak() as peak: ...`` then ``peak.start_mb`` and ``peak.peak_mb`` (None where /proc does
    not say)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_mb = self.peak_mb = private_memory_mb()
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = private_memory_mb()
            if now is not None and now > self.peak_mb:
                self.peak_mb = now

    def start(self) -> "PrivatePeak":
        if self.start_mb is not None:
            self._thread = threading.Thread(target=self._sample, name="private-memory-peak", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> "PrivatePeak":
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            now = private_memory_mb()
            self.peak_mb = max(self.peak_mb, now) if now is not None else self.peak_mb
        return self

    def __enter__(self) -> "PrivatePeak":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# glibc's mallopt parameters: the size above which malloc maps memory of its own (and unmaps it on free), and the
# free space at the heap's top above which free() gives it back; the largest mapping threshold its dynamic rule
# ever sets on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX), with the trim threshold that rule pairs with it (2x).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError where the C library is not glibc)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def freed_memory_returned(threshold: int = 1 << 20):
    """Within the block, glibc's malloc serves every allocation of ``threshold`` bytes or more from a mapping of
    its own and returns it to the system when freed.

    Loading a model partitioned (ZeRO-3) allocates a stream of short-lived tensors of varying sizes: each
    module's gathered weights while rank 0 copies the checkpoint in. glibc's default raises its mapping
    threshold after the first large free, so the following temporaries come from the heap, where freed blocks
    stay resident; measured on llama-250m with 2 ranks, that left 0.85-1.39 GiB of private memory per rank for a
    0.47 GiB partition, against 0.75 with this (docs/llm.md). Afterwards the threshold is set to the value
    glibc's own rule ends at (and the trim threshold it pairs with it, so that training's allocations are served
    as glibc would have served them once warm) and free heap memory is trimmed. A no-op where the C library is
    not glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)


def numel(p: torch.Tensor) -> int:
    """A parameter's full element count: ZeRO-3 leaves an empty p.data and records the size as ds_numel."""
    return getattr(p, "ds_numel", p.numel())


def _held_bytes(p: torch.Tensor) -> int:
    held = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
    t = held if held is not None else p
    return t.numel() * t.element_size()


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (views of one buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


class MemoryTracker:
    """Call ``report()`` whenever a figure is wanted; ``optimizer`` is the torch optimizer itself (for
    DeepSpeed, the client optimizer it wraps). Attaching adds a step pre-hook that notes gradient sizes."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        # id(tensor) -> bytes of its gradient at its last step. ZeRO-1/2 call step() once per param group
        # and ZeRO-3 once per sub-group, swapping param_groups around each call: keying by tensor sums the
        # calls of one update without knowing where an update ends.
        self._grad_bytes: dict[int, int] = {}
        self._hook = optimizer.register_step_pre_hook(self._note_gradients)

    def _note_gradients(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._grad_bytes[id(p)] = p.grad.numel() * p.grad.element_size()

    def report(self) -> dict:
        params = list(self.model.parameters())
        return dict(
            parameters=sum(numel(p) for p in params),
            trainable_parameters=sum(numel(p) for p in params if p.requires_grad),
            parameter_bytes=sum(_held_bytes(p) for p in params),
            optimizer_state_bytes=optimizer_state_bytes(self.optimizer),
            gradient_bytes=sum(self._grad_bytes.values()),
            peak_memory_mb=round(peak_memory_mb(), 1),
        )

    def close(self) -> None:
        self._hook.remove()


def format_report(report: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    return (f"{report['parameters']:,} parameters ({report['trainable_parameters']:,} trainable, "
            f"{mib(report['parameter_bytes'])} held), optimizer state {mib(report['optimizer_state_bytes'])}, "
            f"gradients {mib(report['gradient_bytes'])}, peak process memory {report['peak_memory_mb']:,.1f} MiB")
