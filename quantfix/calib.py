"""Calibration statistics, computed once per (model, calibration set) and cached on disk.

For every input that targeted linear modules read (q/k/v share one, gate/up share one): the
Hessian H = sum x x^T (GPTQ, AWQ's loss, output error of any trial weight), and per input
channel the absmax (outlier channels) and mean |x| (AWQ scales); and the absmax over the first few
samples alone, which the diagnosis's float side reads instead of running the float model on them again.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from quantfix.cache import CACHE_VERSION, atomic_write, load_entry
from quantfix.layerwise import capture_layer0_inputs, iterate_layers, layer_output
from quantfix.arch import decoder_layers
from quantfix.quantize.stats import InputStats
from quantfix.weights import device_room

log = logging.getLogger(__name__)


HESSIAN_DEVICE_RESERVE = 0.3  # Hessians leave this share of the accelerator free (kept simulations, activations)
CACHE_MAX_BYTES = 8 * 10 ** 9  # larger statistics are not written to the cache


@dataclass
class CalibStats:
    inputs: Dict[str, InputStats] = field(default_factory=dict)  # key: first module reading that input
    module_input: Dict[str, str] = field(default_factory=dict)  # module name -> key in inputs
    head_samples: int = 0  # the inputs' head_absmax covers these first samples ...
    head_digest: str = ""  # ... whose token ids hash to this (``samples_digest``)

    def of(self, module: str) -> InputStats:
        return self.inputs[self.module_input[module]]

    def groups(self) -> Dict[str, List[str]]:
        """Modules grouped by the input they read, in model order."""
        out: Dict[str, List[str]] = {}
        for m, key in self.module_input.items():
            out.setdefault(key, []).append(m)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.inputs.values()
                   for t in (st.hessian, st.absmax, st.absmean, st.head_absmax) if t is not None)

    def head_absmax(self, names: List[str], samples: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-channel input absmax of the named modules over ``samples`` (the float model), where
        the statistics hold it for exactly those samples: the first ``head_samples`` of the
        calibration set, the same token ids. Modules without it are left out."""
        if not self.head_samples or len(samples) != self.head_samples or samples_digest(samples) != self.head_digest:
            return {}
        out = {}
        for n in names:
            key = self.module_input.get(n)
            st = self.inputs.get(key) if key is not None else None
            if st is not None and st.head_absmax is not None:
                out[n] = st.head_absmax
        return out

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: torch.save(
            {"inputs": {k: vars(v) for k, v in self.inputs.items()}, "module_input": self.module_input,
             "head_samples": self.head_samples, "head_digest": self.head_digest}, tmp))

    @classmethod
    def load(cls, path: Path) -> Optional["CalibStats"]:
        """The cached statistics at ``path``; None when absent or corrupt (then removed, with a warning)."""
        def parse(b: bytes) -> "CalibStats":
            d = torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
            return cls({k: InputStats(**v) for k, v in d["inputs"].items()}, d["module_input"],
                       d.get("head_samples", 0), d.get("head_digest", ""))
        return load_entry(path, parse)


def samples_digest(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.contiguous().numpy().tobytes()).hexdigest()[:16]


def cache_key(model_fp: str, samples: torch.Tensor, names: List[str], full_hessian: bool = True,
              head_samples: int = 0, dtype: Optional[torch.dtype] = None) -> str:
    """Key of the statistics: the model's content fingerprint (with its dtype), the calibration
    samples, the modules, whether the full Hessians were collected, the head absmax's samples and
    the dtype the forward computed in (None: the model's)."""
    h = hashlib.sha256(f"calib-v{CACHE_VERSION}{'' if full_hessian else '-diag'}"
                       f"{f'-head{head_samples}' if head_samples else ''}"
                       f"{f'-forward-{dtype}' if dtype is not None else ''}".encode())
    h.update(model_fp.encode())
    h.update(samples.numpy().tobytes())
    h.update("\n".join(names).encode())
    return h.hexdigest()[:16]


def _input_hook(full_name: str, seen: Dict[tuple, tuple], acc: Dict[str, dict], module_input: Dict[str, str],
                full_hessian: bool = True, head_samples: int = 0):
    """Forward pre-hook of one targeted module: the first module to see an input tensor in a batch
    owns it (q/k/v share one) and accumulates its Hessian, absmax and |x| sum, and the absmax of
    the first ``head_samples`` samples (batches come in sample order; an input that is not
    [samples, positions, features], as an MoE expert's routed tokens, gets none)."""
    def hook(_mod, args):
        x = args[0]
        # the tensor itself is kept in `seen` for the batch, so its address cannot be reused
        key = (x.data_ptr(), tuple(x.shape))
        owner = seen.setdefault(key, (full_name, x))[0]
        module_input[full_name] = owner
        if owner != full_name:
            return
        x2 = x.reshape(-1, x.shape[-1]).float()
        shape = (x2.shape[1], x2.shape[1]) if full_hessian else (x2.shape[1],)
        a = acc.setdefault(owner, {"h": torch.zeros(shape, device=x2.device),
                                   "max": torch.zeros(x2.shape[1], device=x2.device),
                                   "sum": torch.zeros(x2.shape[1], device=x2.device), "n": 0,
                                   "head": None, "seqs": 0, "head_ok": True})
        a["head_ok"] = a["head_ok"] and x.dim() == 3
        if head_samples and a["head_ok"]:
            left = head_samples - a["seqs"]
            if left > 0:  # as the diagnosis measures it: |x| in the model's dtype, then float32
                m = x[:left].reshape(-1, x.shape[-1]).abs().amax(0).float()
                a["head"] = m if a["head"] is None else torch.maximum(a["head"], m)
            a["seqs"] += x.shape[0]
        if full_hessian:
            add_gram(a["h"], x2)
        else:
            a["h"] += (x2 * x2).sum(0)
        ax = x2.abs()
        a["max"] = torch.maximum(a["max"], ax.amax(0))
        a["sum"] += ax.sum(0)
        a["n"] += x2.shape[0]
    return hook


GRAM_BLOCKS = 4  # on the CPU a Hessian is accumulated in this many column blocks, its lower triangle only


def add_gram(h: torch.Tensor, x: torch.Tensor, blocks: int = GRAM_BLOCKS) -> None:
    """``h += x^T x``. On the CPU only the blocks on and below the diagonal are computed (``blocks`` column
    blocks: 10 of 16 products; the demo's 576- and 1536-wide inputs 40% and 38% faster on 2 cores), the
    upper triangle left as it was until ``symmetric`` mirrors it once at the end; each element is the same
    dot product as in the full product (the same bits on this CPU's BLAS, tests/test_calib.py). CUDA,
    where the full product is cheap: the full product."""
    d = x.shape[1]
    if h.device.type != "cpu" or blocks <= 1 or d < 2 * blocks:
        h.addmm_(x.T, x)
        return
    b = -(-d // blocks)
    for i in range(0, d, b):
        h[i:, i:i + b].addmm_(x[:, i:].T, x[:, i:i + b])


def symmetric(h: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """The full Hessian from ``add_gram``'s accumulation: the lower triangle mirrored, in place (as
    computed, where ``add_gram`` computed the full product). In place because a new tensor per input,
    allocated after the layer's activations, raised the demo's peak host memory 11.0 -> 12.9 GB (the
    trials' 400 MB logits no longer fit the heap's free room)."""
    d = h.shape[-1]
    if h.dim() != 2 or h.device.type != "cpu" or blocks <= 1 or d < 2 * blocks:
        return h
    return h.copy_(torch.tril(h) + torch.tril(h, -1).T)


def _cached(model, cache_path: Optional[Path]) -> Optional[CalibStats]:
    """The statistics cached at ``cache_path``, their Hessians where they were computed (on the
    accelerator while it has room); None when there are none."""
    cached = CalibStats.load(cache_path) if cache_path is not None else None
    if cached is not None:
        log.info("calibration statistics: cached (%s)", cache_path.name)
        dev = next(model.parameters()).device
        for st in cached.inputs.values():
            if st.hessian.dim() == 2 and device_room(dev, st.hessian.numel() * 4, HESSIAN_DEVICE_RESERVE):
                st.hessian = st.hessian.to(dev)
    return cached


@torch.no_grad()
def collect(model, samples: torch.Tensor, names: List[str], batch_size: int = 4,
            cache_path: Optional[Path] = None, progress: bool = True, full_hessian: bool = True,
            head_samples: int = 0) -> CalibStats:
    """Hessians and channel statistics of every input of the named linear modules, layer by layer
    (``collect_layers``), cached at ``cache_path``. Without ``full_hessian`` only each Hessian's
    diagonal (sum of x^2 per channel: the imatrix) is accumulated: at 8B 33 GB of float32 [in, in]
    matrices become a few MB, where no algorithm of the run needs more. ``head_samples``: also the
    input absmax over the first that many samples (``CalibStats.head_absmax``). Called under autocast
    (``weights.autocast``), the layers compute in its dtype; the statistics accumulate in float32."""
    cached = _cached(model, cache_path)
    if cached is not None:
        return cached
    stats = collect_layers(model, samples, names, batch_size, progress, full_hessian, head_samples)
    wanted = set(names)
    missing = wanted - set(stats.module_input)
    if missing:
        log.warning("no calibration statistics for %d modules outside decoder layers (e.g. %s): they use RTN",
                    len(missing), sorted(missing)[0])
    if cache_path is not None:
        size = stats.nbytes()
        if size <= CACHE_MAX_BYTES:
            stats.save(cache_path)
        else:  # writing and re-reading tens of GB costs more than computing them again
            log.info("calibration statistics (%.1f GB) not cached: above %.0f GB", size / 1e9, CACHE_MAX_BYTES / 1e9)
    return stats


@torch.no_grad()
def collect_layers(model, samples: torch.Tensor, names: List[str], batch_size: int = 4, progress: bool = True,
                   full_hessian: bool = True, head_samples: int = 0,
                   after_layer: Optional[Callable[[torch.nn.Module, CalibStats], None]] = None) -> CalibStats:
    """``collect``'s pass, uncached. ``after_layer(layer, stats)``: called once a layer's statistics
    are in; the next layer's inputs are then computed with the layer as it leaves it (sequential
    GPTQ rounds it there: each layer's statistics see the quantized layers before it)."""
    wanted = set(names)
    prefix = {id(m): n for n, m in model.named_modules()}
    head_samples = min(head_samples, len(samples))
    stats = CalibStats(head_samples=head_samples, head_digest=samples_digest(samples[:head_samples]) if head_samples else "")
    inputs = capture_layer0_inputs(model, list(samples.split(batch_size)))
    n_target_layers = sum(1 for layer in decoder_layers(model)
                          if any(f"{prefix[id(layer)]}.{n}" in wanted for n, _ in layer.named_modules()))
    bar = tqdm(total=n_target_layers, desc="calibration stats", unit="layer", disable=not progress)
    acc: Dict[str, dict] = {}
    for i, layer, layer_in in iterate_layers(model, inputs):
        targets = [(f"{prefix[id(layer)]}.{n}", m) for n, m in layer.named_modules()
                   if f"{prefix[id(layer)]}.{n}" in wanted]
        if not targets:
            continue
        seen: Dict[tuple, tuple] = {}
        handles = [m.register_forward_pre_hook(_input_hook(n, seen, acc, stats.module_input, full_hessian,
                                                                  head_samples))
                   for n, m in targets]
        try:
            outs = []
            for h, kw in zip(layer_in.hidden, layer_in.kwargs):
                seen.clear()
                outs.append(layer_output(layer, h, kw))
            if after_layer is None:  # the hooks only read: the next layer's inputs, without a second pass
                layer_in.outputs = outs
        finally:
            for hd in handles:
                hd.remove()
        _keep_layer(acc, stats, head_samples)
        if after_layer is not None:
            after_layer(layer, stats)
        bar.update(1)
    bar.close()
    return stats


def _keep_layer(acc: Dict[str, dict], stats: CalibStats, head_samples: int) -> None:
    """One layer's accumulated statistics into ``stats``. Hessians stay on the accelerator while it has
    room (an 8B model's take 33 GB in float32: more than the host should hold beside the weights), else
    the host."""
    for owner, a in acc.items():
        symmetric(a["h"])
        h = a["h"] if device_room(a["h"].device, 0, HESSIAN_DEVICE_RESERVE) else a["h"].cpu()
        head = a["head"].cpu() if a["head_ok"] and a["head"] is not None and a["seqs"] >= head_samples else None
        stats.inputs[owner] = InputStats(h, a["max"].cpu(), (a["sum"] / a["n"]).cpu(), a["n"], head)
    acc.clear()
