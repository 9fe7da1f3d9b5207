"""Activation outlier channels (per linear input) and per-channel output error (per decoder layer)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from tqdm.auto import tqdm
from accelerate.utils import send_to_device

from quantfix.layerwise import capture_layer0_inputs, iterate_layers, layer_output
from quantfix.arch import decoder_layers
from quantfix.weights import detached_copy, input_device
from quantfix.plotting import figure


def outlier_summary(absmax: torch.Tensor, k: float = 6.0, top: int = 5) -> dict:
    """Outlier channels: per-channel absmax above k x the median channel's absmax."""
    a = absmax.float()
    med = float(a.median())
    thr = k * med
    idx = torch.nonzero(a > thr).flatten()
    order = torch.argsort(a, descending=True)[:top]
    return {"channels": int(a.numel()), "median": round(med, 4), "max": round(float(a.max()), 3),
            "ratio": round(float(a.max()) / max(med, 1e-12), 1), "n_outliers": int(idx.numel()),
            "fraction": round(idx.numel() / a.numel(), 5), "threshold": round(thr, 4),
            "top": [[int(i), round(float(a[i]), 3)] for i in order]}


@torch.no_grad()
def input_absmax(model, samples: torch.Tensor, names: List[str], batch_size: int = 4,
                 progress: bool = True) -> Dict[str, torch.Tensor]:
    """Per-channel absmax of every named module's input, with the model as it is now (float or quantized)."""
    mods = dict(model.named_modules())
    acc: Dict[str, torch.Tensor] = {}

    def hook(name):
        def h(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0).float().cpu()
            acc[name] = torch.maximum(acc[name], x) if name in acc else x
        return h

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    layers = decoder_layers(model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    if len(layers) and all(id(mods[n]) in inside for n in names):  # no logits needed: stop after the last block
        handles.append(layers[-1].register_forward_hook(_stop))
    try:
        for ids in tqdm(list(samples.split(batch_size)), desc="activation absmax", unit="batch",
                        disable=not progress, leave=False):
            try:
                model(input_ids=ids.to(input_device(model)), use_cache=False)
            except _Stopped:
                pass
    finally:
        for h in handles:
            h.remove()
    return acc


class _Stopped(Exception):
    """Raised by ``_stop`` after the last decoder block: the rest of the forward pass (the final norm and
    the vocabulary-wide head, a fifth of a small model's products) computes nothing ``input_absmax`` reads."""


def _stop(*_):
    raise _Stopped


@torch.no_grad()
def channel_errors(model, windows: torch.Tensor, quantized: Dict[str, torch.Tensor], batch_size: int = 4,
                   progress: bool = True) -> Dict[int, dict]:
    """Per decoder layer, on the same float input: relative error per output channel of the layer's
    update (layer(x) - x), float vs quantized weights; counts of channels above 10% and 50%."""
    prefix = {id(m): n for n, m in model.named_modules()}
    out: Dict[int, dict] = {}
    inputs = capture_layer0_inputs(model, list(windows.split(batch_size)))
    for i, layer, li in tqdm(iterate_layers(model, inputs), total=len(decoder_layers(model)),
                             desc="per-channel error", unit="layer", disable=not progress, leave=False):
        p = prefix[id(layer)] + "."
        q = {f"{n[len(p):]}.weight": quantized[n] for n in quantized if n.startswith(p)}  # this layer's only
        if not q:
            continue
        qlayer = None
        err_sum, ref_sum = None, None
        li.outputs = []  # the float layer's outputs are the next layer's inputs: computed once
        for h, kw in zip(li.hidden, li.kwargs):
            y = layer_output(layer, h, kw)
            li.outputs.append(y)
            h = h.to(y.device)  # spread over GPUs: the layer may compute on another device
            upd = y - h
            if qlayer is None:
                qlayer = detached_copy(layer, upd.device, q)
            qo = qlayer(h, **send_to_device(kw, upd.device))
            qo = qo[0] if isinstance(qo, (tuple, list)) else qo
            d = (qo - h - upd).abs().float().reshape(-1, upd.shape[-1]).sum(0).cpu()
            r = upd.abs().float().reshape(-1, upd.shape[-1]).sum(0).cpu()
            err_sum = d if err_sum is None else err_sum + d
            ref_sum = r if ref_sum is None else ref_sum + r
        rel = err_sum / ref_sum.clamp(min=1e-12)
        order = torch.argsort(rel, descending=True)[:5]
        out[i] = {"mean_rel_error": round(float(rel.mean()), 5), "max_rel_error": round(float(rel.max()), 4),
                  "over_10pct": int((rel > 0.1).sum()), "over_50pct": int((rel > 0.5).sum()),
                  "channels": int(rel.numel()), "worst": [[int(c), round(float(rel[c]), 4)] for c in order]}
    return out


def plot_histograms(fp: Dict[str, torch.Tensor], q: Dict[str, torch.Tensor], names: List[str], out_dir: Path,
                    k: float = 6.0) -> List[str]:
    """Per input: the histogram of per-channel absmax (log counts: on a linear axis all the mass sits
    in the first bin) and the channel ranking (absmax, largest first, log scale), float vs
    quantized, one PNG per input."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        a = fp[name].numpy()
        med = float(fp[name].median())
        path = out_dir / f"act_hist_{name.replace('.', '_')}.png"
        with figure(path, 1, 2, dpi=100, figsize=(11, 3.8)) as (fig, axes):
            ax = axes[0]
            ax.hist(a, bins=80, color="#818cf8", alpha=0.8, label="float")
            if name in q:
                ax.hist(q[name].numpy(), bins=80, color="#f97316", alpha=0.5, label="quantized")
            ax.axvline(k * med, ls=":", color="k", label=f"{k:g} x median")
            ax.set_yscale("log")
            ax.set_xlabel("per-channel max |activation|")
            ax.set_ylabel("channels (log)")
            ax.legend(fontsize=8)
            ax = axes[1]
            top = min(len(a), 64)
            ranked = torch.sort(fp[name], descending=True).values[:top].numpy()
            ax.plot(range(top), ranked, "o-", ms=3, color="#818cf8", label="float")
            if name in q:
                ax.plot(range(top), torch.sort(q[name], descending=True).values[:top].numpy(), "x", ms=4,
                        color="#f97316", label="quantized")
            ax.axhline(k * med, ls=":", color="k", label=f"{k:g} x median")
            ax.set_yscale("log")
            ax.set_xlabel(f"channel rank (top {top})")
            ax.set_ylabel("max |activation| (log)")
            ax.legend(fontsize=8)
            fig.suptitle(f"input of {name}")
        paths.append(str(path))
    return paths
