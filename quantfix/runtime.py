"""What the stages that run the model receive: the live model and how to batch it (``Runtime``), and
the token windows of the run (``RunData``). The loop builds both once; stages take them as
arguments and never see the loop's session."""
from __future__ import annotations

import ctypes
import gc
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from quantfix.errors import QuantfixError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Runtime:
    model: Any  # a transformers causal LM (weights may be swapped by a WeightBank)
    tokenizer: Any
    device: torch.device
    batch_size: int  # windows per forward pass; lowered for the rest of the run on out-of-memory
    seed: int = 0

    def batched(self, fn: Callable[[int], T]) -> T:
        """fn(batch_size), halving the batch size on a CUDA out-of-memory error (said once in the log
        and kept for the rest of the run); at batch size 1 the error names the fix."""
        while True:
            try:
                return fn(self.batch_size)
            except torch.cuda.OutOfMemoryError as e:
                gc.collect()
                torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise QuantfixError("out of GPU memory at eval.batch_size=1: lower eval.seq_len, or spread the "
                                        "model over more GPUs / the CPU with model.device_map=auto") from e
                self.batch_size //= 2
                log.warning("out of GPU memory: evaluation batch size lowered to %d", self.batch_size)


@dataclass
class RunData:
    windows: torch.Tensor  # [n_windows, seq_len] evaluation token windows (fixed, deterministic)
    samples: torch.Tensor  # [n_samples, seq_len] calibration samples (seeded)
    data_dir: str  # where named domains are read from
    calibration_domains: tuple = ()
    offline: bool = False  # never fall back to the hub for a named data set
    eval_source: str = ""  # the deployment text the eval windows come from
    # the diagnosed weights come from an existing checkpoint (quantized.name_or_path): its
    # calibration set is unknown (calibration_domains are quantfix's own, for its options)
    external_checkpoint: bool = False


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_host_memory() -> bool:
    """Have glibc serve every allocation from its heap and keep what is freed there (up to 2 GB free at
    the top), instead of mapping each block above 32 MB fresh and unmapping it on free: a CPU run
    allocates and frees the same large tensors batch after batch (the logits alone, 400 MB a batch on
    the demo), and every fresh mapping is page-faulted and zeroed again. The demo's run on a 2-core CPU
    (warm caches): 11.5M -> 2.0M page faults, system time 51 -> 14 s, 2:50 -> 2:15 wall, peak host memory
    5.95 -> 6.29 GB, the same trials. It holds for the rest of the process (a notebook that runs the loop
    keeps it). Returns whether it was applied (glibc on Linux only; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(param, value) == 1 for param, value in
            ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1), (_M_TOP_PAD, 2 ** 28))]  # each, even if one fails
    return all(done)
