"""Stage: evaluate. Perplexity, KL divergence from the float model's next-token distribution, top-1.

The float model's log-probs are computed once per (model, eval set) and cached on disk: the full
distribution in fp16 when it fits in ``full_max_mb`` (the exact KL: fp16 log-probs change it by
1e-5 relative), else the top-k log-probs plus the tail mass (KL over the top-k tokens and one
"rest" bucket: a lower bound of the full KL). Measured on SmolLM2-135M (1530 WikiText-2 tokens, a
4-bit perturbation, full KL 0.408): top-64 + tail reads 17% low, top-256 8.5%, top-1024 3.4%,
top-4096 0.9%. That bound was why quantfix's predicted GGUF KLD read 6-11% below llama-perplexity's
(which sums every token above e^-16: +0.1% of the full KL).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantfix.cache import CACHE_VERSION, atomic_write, load_entry
from quantfix.weights import input_device

log = logging.getLogger(__name__)


@dataclass
class Reference:
    nll: torch.Tensor  # [N] float model's NLL of each target token
    top_idx: torch.Tensor  # [N, k] int64 (with a full reference: [N, 1], the float32 argmax)
    top_logp: torch.Tensor  # [N, k] float32 ([N, 0] with a full reference)
    full_logp: Optional[torch.Tensor] = None  # [N, V] float16, when it fits
    # with full_logp, per row in float32: the logsumexp of the fp16 log-probs (the rows are renormalized
    # by it, so the float model scores KL 0 against itself) and sum p log p of the renormalized row
    log_norm: Optional[torch.Tensor] = None
    neg_entropy: Optional[torch.Tensor] = None
    # the top-k rows kept on an accelerator between evaluations (one upload per run), by device
    _on_device: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # a full reference built elsewhere (tests, older callers): its row statistics and argmax
        if self.full_logp is not None and (self.neg_entropy is None or self.log_norm is None):
            self.log_norm, self.neg_entropy = _row_stats(self.full_logp)
        if self.full_logp is not None and self.top_idx.shape[-1] == 0:
            self.top_idx = self.full_logp.float().argmax(-1, keepdim=True)

    @property
    def n_tokens(self) -> int:
        return self.nll.numel()

    def rows(self, sl: slice, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k indices and log-probs of rows ``sl``, on ``device`` (kept there when they fit)."""
        if device.type == "cpu":
            return self.top_idx[sl], self.top_logp[sl]
        if self.top_idx.numel() * 12 > _DEVICE_REF_MAX_BYTES:
            return self.top_idx[sl].to(device, non_blocking=True), self.top_logp[sl].to(device, non_blocking=True)
        key = str(device)
        if key not in self._on_device:
            self._on_device.clear()  # one device copy at a time
            self._on_device[key] = (self.top_idx.to(device), self.top_logp.to(device))
        idx, logp = self._on_device[key]
        return idx[sl], logp[sl]

    def save(self, path: Path) -> None:
        tensors = {"nll": self.nll, "top_idx": self.top_idx, "top_logp": self.top_logp, "full_logp": self.full_logp,
                   "log_norm": self.log_norm, "neg_entropy": self.neg_entropy}
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))

    @classmethod
    def load(cls, path: Path) -> Optional["Reference"]:
        """The cached reference at ``path``; None when absent or corrupt (then removed, with a warning)."""
        return load_entry(path, lambda b: cls(**torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)))


@dataclass
class Metrics:
    ppl: float
    nll: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1: float
    n_tokens: int

    def to_dict(self) -> Dict[str, float]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def cache_key(model_fp: str, windows: torch.Tensor, topk: int, full_max_mb: int, dtype: torch.dtype) -> str:
    """Key of a float reference: the model's content fingerprint (``cache.model_fingerprint``), the
    eval windows, the reference's shape settings and the dtype."""
    # the shape too: 2 windows of 512 and 4 of 256 cut from one text hold the same bytes
    h = hashlib.sha256(f"ref-v{CACHE_VERSION}|{model_fp}|{topk}|{full_max_mb}|{dtype}|{tuple(windows.shape)}".encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()[:16]


def _batches(windows: torch.Tensor, batch_size: int):
    return list(windows.split(batch_size))


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of the next-token logits at positions 0..L-2, flattened to [B*(L-1), V], float32."""
    logits = model(input_ids=ids.to(input_device(model)), use_cache=False).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])


@torch.no_grad()
def reference(model, windows: torch.Tensor, batch_size: int, topk: int, full_max_mb: int,
              cache_path: Optional[Path] = None, progress: bool = True) -> Reference:
    cached = Reference.load(cache_path) if cache_path is not None else None
    if cached is not None:
        log.info("float reference log-probs: cached (%s)", cache_path.name)
        return cached
    vocab = model.get_output_embeddings().weight.shape[0]
    n = windows.shape[0] * (windows.shape[1] - 1)
    full = n * vocab * 2 <= full_max_mb * 2 ** 20
    nll, idx, lp, fulls, norms, negent = [], [], [], [], [], []
    for ids in tqdm(_batches(windows, batch_size), desc="float reference", unit="batch", disable=not progress):
        logp = _logprobs(model, ids)
        tgt = ids[:, 1:].reshape(-1).to(logp.device)
        nll.append(-logp.gather(1, tgt[:, None]).squeeze(1).cpu())
        if full:
            half = logp.half()
            fulls.append(half.cpu())
            norm, ne = _row_stats(half)
            norms.append(norm.cpu())
            negent.append(ne.cpu())
            idx.append(logp.argmax(-1, keepdim=True).cpu())
        else:
            v, i = logp.topk(min(topk, vocab), dim=-1)
            lp.append(v.cpu())
            idx.append(i.cpu())
    if full:
        ref = Reference(torch.cat(nll), torch.cat(idx), torch.zeros(n, 0), torch.cat(fulls), torch.cat(norms),
                        torch.cat(negent))
    else:
        ref = Reference(torch.cat(nll), torch.cat(idx), torch.cat(lp))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        ref.save(cache_path)
    return ref


def topk_tail_kl(p_top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the reference's top-k tokens plus one bucket for the rest of the vocabulary
    (llama.cpp's saved-logits KLD), per token, from top-k log-probs of both distributions."""
    p_exp = p_top.exp()
    kl = (p_exp * (p_top - q_top)).sum(-1)
    p_tail = (1 - p_exp.sum(-1)).clamp(min=1e-10)
    q_tail = (1 - q_top.exp().sum(-1)).clamp(min=1e-10)
    return (kl + p_tail * (p_tail.log() - q_tail.log())).clamp(min=0)


def _row_stats(p_logp16: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, sum p log p of the renormalized row) of each row of fp16 log-probs, in float32
    (-inf entries give no term; NaN rows stay NaN)."""
    norms, negent = [], []
    for rows in p_logp16.split(_FULL_ROWS):  # float32 temporaries [256, V]
        lp = rows.float()
        norm = torch.logsumexp(lp, dim=-1)
        lp = lp - norm[:, None]
        norms.append(norm)
        negent.append(torch.where(torch.isneginf(lp), 0.0, lp.exp() * lp).sum(-1))
    return torch.cat(norms), torch.cat(negent)


def _kld_rows(ref: Reference, sl: slice, q_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(P_float || Q) for rows sl of the reference: with a full reference, the
    stored sum p log p minus sum p log q (one exp and one dot product per row; the row's
    renormalization applied to the sum)."""
    if ref.full_logp is not None:
        starts = range(sl.start, sl.start + q_logp.shape[0], _FULL_ROWS)
        return torch.cat([_full_kl(ref, s, q) for s, q in zip(starts, q_logp.split(_FULL_ROWS))] or [q_logp[:, 0]])
    idx = ref.top_idx[sl].to(q_logp.device)
    return topk_tail_kl(ref.top_logp[sl].to(q_logp.device), q_logp.gather(1, idx))


_FULL_ROWS = 256  # rows of a full reference scored at a time: the float32 temporaries stay [256, V]


def _full_kl(ref: Reference, start: int, q_logp: torch.Tensor) -> torch.Tensor:
    """KL of rows ``start ..`` of a full reference against ``q_logp``: the stored sum p log p minus
    sum p log q, the row's renormalization applied to the sum."""
    dev, sl = q_logp.device, slice(start, start + q_logp.shape[0])
    p = ref.full_logp[sl].to(dev)
    p = p.float().exp_() if p.dtype != torch.float32 else p.exp()  # in place only on a copy
    # q = -inf: the most negative float (p = 0 there gives no term, p > 0 an infinite KL); NaN stays
    cross = (p.mul_(q_logp.clamp(min=torch.finfo(torch.float32).min))).sum(-1) * torch.exp(-ref.log_norm[sl].to(dev))
    return (ref.neg_entropy[sl].to(dev) - cross).clamp(min=0)


def _ref_top1(ref: Reference, sl: slice) -> torch.Tensor:
    return ref.top_idx[sl, 0]


class Evaluator:
    """Scores a model against one float reference: NLL/PPL, KL divergence, top-1 agreement.
    ``compile`` (eval.compile) runs the per-token statistics through torch.compile on CUDA: one
    fused pass over the bf16 logits for ~7 s of compiling once per evaluator (2-4% faster
    evaluation, benchmarks/README.md), so it pays off only for long runs with large eval sets."""

    def __init__(self, ref: Reference, compile: bool = False, skip: int = 0):
        self.ref = ref
        self.compile = compile
        # score only the positions from ``skip`` on in every window (llama-perplexity scores the
        # second half of each chunk: skip = seq_len // 2); the reference holds every position
        self.skip = skip
        self._fn: Any = None  # the compiled statistics, built on first CUDA use
        self._eager = False  # compiling failed: eager from then on

    @torch.no_grad()
    def __call__(self, model, windows: torch.Tensor, batch_size: int, progress: bool = True,
                 desc: str = "evaluate") -> Metrics:
        ref = self.ref
        nll, kld, agree = [], [], []
        row = 0
        for ids in tqdm(_batches(windows, batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            if ref.full_logp is None:  # top-k reference: never materialize the full log-softmax
                n, k, a = self._topk_batch(model, ids, row)
                row += n.numel()
            else:
                logp = _logprobs(model, ids)
                sl = slice(row, row + logp.shape[0])
                row += logp.shape[0]
                tgt = ids[:, 1:].reshape(-1).to(logp.device)
                n, k = -logp.gather(1, tgt[:, None]).squeeze(1), _kld_rows(ref, sl, logp)
                a = logp.argmax(-1).cpu() == _ref_top1(ref, sl)
            t = ids.shape[1] - 1
            nll.append(scored(n, t, self.skip))
            kld.append(scored(k, t, self.skip))
            agree.append(scored(a, t, self.skip))
        if row > ref.n_tokens:  # fewer is fine: a prefix of the eval windows
            raise ValueError(f"eval windows give {row} tokens but the reference has {ref.n_tokens}")
        # one device-to-host copy at the end: no synchronization inside the loop
        return summarize(torch.cat(nll).cpu(), torch.cat(kld).cpu(), torch.cat([a.cpu() for a in agree]).float())

    def _stats_fn(self, device: torch.device):
        if device.type != "cuda" or not self.compile or self._eager:
            return None
        if self._fn is None:
            try:
                self._fn = torch.compile(token_stats, dynamic=True)
            except Exception as e:  # noqa: BLE001 - no compiler: eager, said once
                log.warning("torch.compile unavailable (%s); evaluating in eager mode", str(e).splitlines()[0][:120])
                self._eager = True
        return self._fn

    @torch.no_grad()
    def _topk_batch(self, model, ids: torch.Tensor, row: int):
        """NLL, KLD (top-k + tail) and top-1 agreement of one batch, left on the model's device."""
        logits = model(input_ids=ids.to(input_device(model)), use_cache=False).logits[:, :-1]
        b, t, _ = logits.shape
        dev = logits.device
        tgt = ids[:, 1:].to(dev)
        idx, p_top = self.ref.rows(slice(row, row + b * t), dev)
        idx, p_top = idx.reshape(b, t, -1), p_top.reshape(b, t, -1)
        fn = self._stats_fn(dev)
        if fn is not None:
            try:
                nll, kld, top1 = fn(logits, tgt, idx, p_top)
            except torch.cuda.OutOfMemoryError:
                raise  # the caller lowers the batch size
            except Exception as e:  # noqa: BLE001 - a compiler failure at run time: eager from now on
                log.warning("compiled evaluation failed (%s); evaluating in eager mode", str(e).splitlines()[0][:120])
                self._eager, fn = True, None
        if fn is None:  # one sequence at a time: the float32 temporaries stay one sequence big
            outs = [token_stats(logits[i], tgt[i], idx[i], p_top[i]) for i in range(b)]
            nll, kld, top1 = (torch.stack(x) for x in zip(*outs))
        agree = top1 == idx[..., 0]
        return nll.reshape(-1), kld.reshape(-1), agree.reshape(-1)


def evaluate(model, windows: torch.Tensor, ref: Reference, batch_size: int, progress: bool = True,
             desc: str = "evaluate") -> Metrics:
    """One evaluation, eager (the loop keeps one ``Evaluator`` for the whole run)."""
    return Evaluator(ref)(model, windows, batch_size, progress, desc)


_DEVICE_REF_MAX_BYTES = 2 * 2 ** 30  # larger top-k references are streamed batch by batch


def token_stats(logits: torch.Tensor, tgt: torch.Tensor, idx: torch.Tensor, p_top: torch.Tensor):
    """Per-token NLL, KL(P_float || Q) over the top-k plus the tail bucket, and the argmax, from the
    logits [..., V] in any float dtype. Math in float32; the only full-vocabulary passes are one
    logsumexp and one argmax (fused into one kernel when compiled). A row with a NaN or +inf logit
    has a non-finite NLL, which ``summarize`` counts as a disagreement."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    kld = topk_tail_kl(p_top, lf.gather(-1, idx) - lse)
    nll = (lse - lf.gather(-1, tgt.unsqueeze(-1))).squeeze(-1)
    return nll, kld, lf.argmax(-1)


def summarize(nll: torch.Tensor, kld: torch.Tensor, agree: torch.Tensor) -> Metrics:
    """Mean NLL, PPL, KLD statistics and top-1 agreement. A token whose NLL or KLD is not finite
    counts as a disagreement (and makes PPL / KLD non-finite, which ``verdict.check`` fails)."""
    agree = agree.bool() & torch.isfinite(nll) & torch.isfinite(kld)
    mean_nll = float(nll.double().mean())
    return Metrics(
        ppl=math.inf if mean_nll > 700 else math.exp(mean_nll), nll=mean_nll, kld_mean=float(kld.double().mean()),
        kld_p99=float(torch.quantile(kld.float(), 0.99)), kld_max=float(kld.max()),
        top1=float(agree.double().mean()), n_tokens=int(nll.numel()),
    )


def _nonfinite_weight(model) -> Optional[str]:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            bad = p[~torch.isfinite(p)]
            kinds = "/".join(k for k, f in (("nan", torch.isnan), ("inf", torch.isinf)) if bool(f(bad).any()))
            return f"{name} ({bad.numel()} {kinds} values in the weight)"
    return None


@torch.no_grad()
def locate_nonfinite(model, ids: torch.Tensor) -> Optional[str]:
    """The first place a non-finite value enters the model: a parameter or buffer holding NaN/Inf,
    else the first module to finish (innermost first) with a non-finite output on ``ids``; None if the
    model's logits are finite there."""
    found = _nonfinite_weight(model)
    if found is not None:
        return found
    first: list = []

    def hook(name):
        def fn(_mod, _args, out):
            t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
            if not first and isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                first.append(f"{name} (non-finite output)")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(input_ids=ids.to(input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first[0] if first else None


def scored(x: torch.Tensor, per_window: int, skip: int) -> torch.Tensor:
    """The per-token values of the positions scored: from ``skip`` on in each window of
    ``per_window`` positions (all of them with skip 0)."""
    return x if not skip else x.reshape(-1, per_window)[:, skip:].reshape(-1)


def baseline_metrics(ref: Reference, per_window: int = 0, skip: int = 0) -> Metrics:
    """The float model's metrics on the scored positions (``scored``)."""
    nll = scored(ref.nll, per_window, skip)
    return summarize(nll, torch.zeros_like(nll), torch.ones_like(nll))


GREEDY_PROMPT, GREEDY_NEW = 32, 16


@torch.no_grad()
def greedy_repeats(model, tokenizer, window: torch.Tensor) -> Optional[Tuple[int, str]]:
    """(token id, decoded text) when the model's greedy continuation (GREEDY_NEW tokens) of the
    window's first GREEDY_PROMPT tokens is a single token repeated, else None: a tokenizer that
    does not match the weights, or a broken model. Stops at the first token unlike the first (a
    healthy model: two forward passes, not GREEDY_NEW; 2.5-3 s of the CPU demo's run)."""
    ids = window[:GREEDY_PROMPT].unsqueeze(0).to(input_device(model))
    new: List[int] = []
    for _ in range(GREEDY_NEW):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(nxt))
        if new[-1] != new[0]:
            return None
        ids = torch.cat([ids, nxt], dim=1)
    return new[0], tokenizer.decode(new)
