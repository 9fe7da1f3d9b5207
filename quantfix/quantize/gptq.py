"""GPTQ at several precisions in one sweep.

The modules that read one input share its Hessian, and a module's options (bits, group size,
symmetry, scales) differ only in their quantizer. So the activation order and the Hessian's
factorization are computed once, and one column loop updates every option at once (on the CPU the
loop's per-column overhead, not its arithmetic, is most of GPTQ's time: 9 options cost about what
2-3 did one at a time). The per-element arithmetic is llm-compressor 0.14's (``quantize_weight``
with static activation order: each column keeps its original group's scale; compressed-tensors'
fused quantize-dequantize), and the block propagation is its ``bmm`` per option, so every option's
result equals that engine's single-option sweep bit for bit (tests/test_quantize_gptq.py).
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Quantizer:
    """One option's integer grid: width, group size (0: per channel), symmetry, and its scale and
    zero point per (row, group) of the original column order, as the export stores them."""

    bits: int
    group: int
    symmetric: bool
    scale: Tensor  # [rows, n_groups]
    zero: Tensor  # [rows, n_groups], integer-valued


def factorize(H: Tensor, W: Tensor, damp: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(columns in descending diag(H) order, the permuted weight with dead columns zeroed, the upper
    Cholesky factor of the dampened inverse Hessian), as llm-compressor's ``apply_activation_ordering``
    and ``factorize_hessian`` compute them for one Hessian."""
    H = H.float()  # index_select below copies: the caller's H is left as it was
    perm = torch.argsort(torch.diagonal(H), descending=True)
    H = H.index_select(0, perm).index_select(1, perm)  # advanced indexing: 4x slower on the CPU, the same values
    Wp = W.float().index_select(1, perm)
    diag = torch.diagonal(H)
    dead = diag == 0
    if dead.any():
        diag.masked_fill_(dead, 1.0)
        Wp[:, dead] = 0
    diag.add_(damp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H, check_errors=False)
    if int(info) != 0:
        return perm, Wp, torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return perm, Wp, torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _ranges(qs: List[Quantizer], device) -> Tuple[Tensor, Tensor]:
    """Every option's integer range ([B, 1])."""
    return (torch.tensor([-(2.0 ** (q.bits - 1)) for q in qs], device=device)[:, None],
            torch.tensor([2.0 ** (q.bits - 1) - 1 for q in qs], device=device)[:, None])


def _grids(qs: List[Quantizer], perm: Tensor, i1: int, i2: int) -> Tuple[Tensor, Tensor]:
    """Every option's scale and zero point for the permuted columns ``i1:i2`` only, column-major ([B, block
    columns, rows]), gathered from its groups' values (``index_select``: advanced indexing was 5x slower on the
    CPU); all the columns at once, then a transposed copy per block, took 15% of a demo down_proj's sweep."""
    S, Z = [], []
    for q in qs:
        idx = perm[i1:i2] // (q.group or perm.numel())
        s = q.scale.float().index_select(1, idx).T
        S.append(s)
        Z.append(torch.zeros_like(s) if q.symmetric else q.zero.float().index_select(1, idx).T)
    return torch.stack(S), torch.stack(Z)


@torch.no_grad()
def sweep(W: Tensor, H: Tensor, qs: List[Quantizer], damp: float = 0.01, block: int = 128,
          factors: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> List[Tensor]:
    """GPTQ of ``W`` [rows, cols] (float32) at every quantizer of ``qs``; one [rows, cols] result each,
    in the original column order. ``factors``: ``factorize(H, W, damp)`` when already computed."""
    rows, cols = W.shape
    perm, Wp, Hinv = factors if factors is not None else factorize(H, W, damp)
    lo, hi = _ranges(qs, perm.device)
    Wb = Wp.unsqueeze(0).expand(len(qs), rows, cols).clone()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        Err1 = _block(Wb, Hinv, (*_grids(qs, perm, i1, i2), lo, hi), i1, i2)
        for b in range(len(qs)):  # as the engine's bmm per item: the same float sums
            Wb[b:b + 1, :, i2:] -= torch.bmm(Err1[b:b + 1], Hinv[None, i1:i2, i2:])
    inv = torch.argsort(perm)
    return [Wb[b].index_select(1, inv) for b in range(len(qs))]


def _block(Wb: Tensor, Hinv: Tensor, grids, i1: int, i2: int) -> Tensor:
    """One block of columns, every option at once: quantize each column, spread its error over the
    block's later columns; the block's quantized values written back into ``Wb``. ``grids``: the block's
    scales and zero points column-major, and the integer ranges. Returns the errors.
    The block is held column-major ([options, columns, rows]): a column and the rows of each later
    column it updates are contiguous (row-major, the update ran on short strided rows: the sweep took 2x
    as long on a CPU, demo shapes). Each element sees the same operations in the same order, so the same bits
    (each column's update is written into one buffer, not a fresh product: ~20% faster). The column loop
    is TorchScript (``_columns``): the same operators without Python's per-operator overhead, and without
    the interpreter lock, so the CPU's parallel option simulations sweep at once (Python's loop held
    the lock: two threads took as long as one; scripted, a demo stack's block 1.2-1.4x faster on one
    thread and 1.8x on two)."""
    Sb, Zb, lo, hi = grids
    return _script()(Wb, Hinv, Sb, Zb, lo, hi, i1, i2)


def _columns(Wb: Tensor, Hinv: Tensor, Sb: Tensor, Zb: Tensor, lo: Tensor, hi: Tensor, i1: int, i2: int) -> Tensor:
    W1 = Wb[:, :, i1:i2].transpose(1, 2).contiguous()
    Q1 = torch.empty_like(W1)  # every column is written
    Err1 = torch.empty_like(W1)
    upd = torch.empty_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
        w = W1[:, i]
        s, z = Sb[:, i], Zb[:, i]
        scaled = w / s
        scaled += z
        q = (torch.round(torch.clamp(scaled, lo, hi)) - z) * s
        error = (w - q) / Hinv1[i, i]
        Q1[:, i] = q
        Err1[:, i] = error
        torch.mul(error.unsqueeze(1), Hinv1[i, i:].unsqueeze(-1), out=upd[:, i:])
        W1[:, i:] -= upd[:, i:]
    Wb[:, :, i1:i2] = Q1.transpose(1, 2)
    return Err1.transpose(1, 2).contiguous()


_SCRIPTED: list = []
_SCRIPT_LOCK = threading.Lock()  # the CPU's option simulations call it from several threads


def _script():
    """``_columns`` compiled by TorchScript once per process (about 0.1 s); no CPU fusion, so the same
    kernels as the Python loop run, in the same order (tests/test_quantize_gptq.py: the engine's bits,
    both loops)."""
    with _SCRIPT_LOCK:
        if not _SCRIPTED:
            _SCRIPTED.append(_compiled())
    return _SCRIPTED[0]


def _compiled():
    """TorchScript is deprecated (torch 2.13 warns, still compiles); where it is gone or fails, the
    Python loop runs (the same bits, slower)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_columns)
    except Exception:  # noqa: BLE001 - any failure to compile: the interpreted loop is equivalent
        return _columns
