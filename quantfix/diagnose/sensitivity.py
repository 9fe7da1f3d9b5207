"""Sensitivity: how much the KL divergence from the float model drops when a part is restored.

``exact`` is the seed's measurement: restore one part to float, re-evaluate the whole eval set,
one evaluation per part (L+1 for L layers). ``taylor`` estimates every part's contribution in one
forward + backward pass of the quantized model (first order in the restored part's output
change). ``fisher`` does it in one pass of the float model, to second order:

    KL(P || Q) ~= 1/2 * E_y[(grad_h log p(y) . dh)^2],  y ~ P (teacher-forced, per sequence),

where dh is the error the part's quantized weights inject at its output given the float input
(dh = x (W - W_q)^T for a module; layer_q(x) - layer(x) for a decoder layer). ``fast`` (the
default, ``diagnose.sensitivity.method``) takes layers, types and modules from Taylor and scores
the planner's precision options with Fisher. In each pass the gradient is taken once for all
parts, so the cost does not grow with the number of parts, and each precision option of a
module costs one extra product.
"""
from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from contextlib import contextmanager
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from accelerate.utils import send_to_device

from quantfix.arch import decoder_layers

from quantfix.weights import autocast as _autocast
from quantfix.weights import detached_copy, device_room, input_device, pass_dtype, set_weight, weight_of
from quantfix.plan import layer_index, module_type

log = logging.getLogger(__name__)


@dataclass
class Sensitivity:
    method: str
    layers: Dict[int, float]  # decoder layer -> estimated KLD reduction when restored to float
    types: Dict[str, float]  # module type (q_proj, ...) -> same, summed over layers
    modules: Dict[str, float] = field(default_factory=dict)  # single module -> same
    options: Dict[str, Dict[str, float]] = field(default_factory=dict)  # module -> option label -> KLD estimate
    seconds: float = 0.0
    n_tokens: int = 0
    # the per-module KLD the options are measured against (same estimator as `options`)
    option_base: Dict[str, float] = field(default_factory=dict)
    # where the seconds went: "taylor", "option simulation", "fisher passes" (seconds), "passes" (count)
    parts: Dict[str, float] = field(default_factory=dict)
    # side ("float", "quantized") -> module -> per-channel input absmax over the first ``absmax_windows``
    # windows, taken in the passes' own forwards (``fast``); kept in the cache entry, not in the report
    absmax: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    absmax_windows: int = 0

    def to_dict(self) -> dict:
        return {"method": self.method, "seconds": round(self.seconds, 2), "n_tokens": self.n_tokens,
                "parts": {k: round(v, 2) for k, v in self.parts.items()},
                "layers": {str(k): v for k, v in self.layers.items()}, "types": self.types,
                "modules": self.modules, "options": self.options, "option_base": self.option_base}

    def cache_dict(self) -> dict:
        """``to_dict`` with the input absmax: per side, each distinct vector once (modules that read one input
        share it) as its float32 bytes in base64, and module -> which (the demo's entry 1.2 MB; a JSON list of
        numbers per module took 6.1 MB)."""
        out = {}
        for side, mods in self.absmax.items():
            values, of = {}, {}
            for n, t in mods.items():
                raw = t.detach().float().cpu().contiguous().numpy().tobytes()
                key = hashlib.sha1(raw).hexdigest()[:16]
                values.setdefault(key, base64.b64encode(raw).decode())
                of[n] = key
            out[side] = {"values": values, "of": of}
        return {**self.to_dict(), "absmax_windows": self.absmax_windows, "absmax": out}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        return cls(method=d["method"], layers={int(k): v for k, v in d["layers"].items()}, types=d["types"],
                   modules=d.get("modules", {}), options=d.get("options", {}), seconds=d.get("seconds", 0.0),
                   n_tokens=d.get("n_tokens", 0), option_base=d.get("option_base", {}), parts=d.get("parts", {}),
                   absmax={side: _absmax_of(v) for side, v in d.get("absmax", {}).items()},
                   absmax_windows=d.get("absmax_windows", 0))

    def ranked_layers(self) -> List[int]:
        return sorted(self.layers, key=lambda i: -self.layers[i])


def _absmax_of(entry: dict) -> Dict[str, torch.Tensor]:
    """One side of ``Sensitivity.cache_dict``'s absmax back to module -> float32 tensor."""
    vec = {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.float32) for k, v in entry["values"].items()}
    return {n: vec[k] for n, k in entry["of"].items()}


def _layer_prefix(model) -> Dict[int, str]:
    ids = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    return {ids[id(m)]: n for n, m in model.named_modules() if id(m) in ids}


def _layer_delta_hook(weights: Dict[str, torch.Tensor], state: Dict[str, object], on_delta):
    """A forward hook (with kwargs) for one decoder layer: reruns the layer on the same input with
    ``weights`` swapped in, on a throw-away copy (swapping the live layer's parameters would bump
    their versions under autograd's feet), and hands (output tensor, other - live output) to
    ``on_delta``. ``state["busy"]`` keeps the copy's own hooks quiet."""
    def fwd(layer, args, kwargs, out):
        if state.get("busy"):
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        h_out = out[0] if isinstance(out, (tuple, list)) else out
        state["busy"] = True
        try:
            with torch.no_grad():
                dev = h_out.device  # the layer's execution device (its inputs may come from another)
                other = detached_copy(layer, dev, weights)
                o_out = other(hidden.detach().to(dev), **send_to_device(kw, dev))
                del other
        finally:
            state["busy"] = False
        o_out = o_out[0] if isinstance(o_out, (tuple, list)) else o_out
        on_delta(h_out, (o_out - h_out.detach()).float())
    return fwd


def _input_grad_hook(state: Dict[str, object], on_grad):
    """Forward hook factory for the named linear modules: keep the module's input (once, not one
    output per option) and call on_grad(name, grad of the output, input) in the backward pass. While
    ``state["absmax"]`` is a dict, also the input's per-channel absmax into it (running maximum)."""
    def make(name):
        def fwd(_m, args, out):
            if state.get("busy"):
                return
            acc = state.get("absmax")
            if acc is not None:  # as the diagnosis measures it: |x| in the model's dtype, then float32
                a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
                if name in acc and acc[name].shape == a.shape and acc[name].device == a.device:
                    torch.maximum(acc[name], a, out=acc[name])  # in place: no new tensor between the activations
                else:
                    acc[name] = a
                state["absmax_seen"].add(name)
            if not out.requires_grad:
                return
            x = args[0].detach()
            out.register_hook(lambda g: on_grad(name, g, x))
        return fwd
    return make


@contextmanager
def _gradient_hooks(model, module_names, module_hook, layer_ids, layer_hook):
    """Make the embeddings' output a leaf that needs a gradient (the weights stay frozen), hook the
    named modules and decoder layers for the duration, and remove every hook afterwards."""
    mods = dict(model.named_modules())
    layers = decoder_layers(model)
    emb = model.get_input_embeddings()
    handles = [emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))]
    handles += [mods[n].register_forward_hook(module_hook(n)) for n in module_names]
    handles += [layers[i].register_forward_hook(layer_hook(i), with_kwargs=True) for i in layer_ids]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _to_floats(d: Dict) -> Dict:
    """{key: 0-d tensor or float} -> {key: float}, with one device-to-host copy."""
    keys = list(d)
    tensors = [d[k] for k in keys]
    if not any(isinstance(t, torch.Tensor) for t in tensors):
        return {k: float(v) for k, v in d.items()}
    dev = next(t.device for t in tensors if isinstance(t, torch.Tensor))
    vals = torch.stack([t.to(dev).double() if isinstance(t, torch.Tensor) else torch.tensor(float(t), device=dev,
                                                                                             dtype=torch.float64)
                        for t in tensors]).cpu().tolist()
    return dict(zip(keys, vals))


class _DeltaCache:
    """Weight differences kept on the accelerator for the whole pass while it has room (``reserve``:
    the share of its memory left free; on the CPU there is nothing to save: they are recomputed)."""

    def __init__(self, reserve: float = 0.25):
        self.reserve, self.store = reserve, {}

    def get(self, key, device: torch.device, make):
        hit = self.store.get(key)
        if hit is not None and hit.device == device:
            return hit
        value = make()
        if device_room(device, 0, self.reserve):
            self.store[key] = value
        return value


class _Renamed(Mapping):
    """{parameter name inside a layer: weights[module name]}, each value fetched when asked: a lazy
    ``weights`` (the bank's ``LazyWeights``) then computes one layer at a time."""

    def __init__(self, weights, names: Dict[str, str]):
        self._w, self._names = weights, names

    def __getitem__(self, key):
        return self._w[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _layer_weights(model, weights) -> Dict[int, Mapping]:
    """decoder layer -> {parameter name inside the layer: tensor} for the named module weights."""
    return {i: _Renamed(weights, {f"{n[len(p) + 1:]}.weight": n for n in weights if n.startswith(p + ".")})
            for i, p in _layer_prefix(model).items()}


@dataclass(frozen=True)
class PassSettings:
    """How a one-pass estimate runs: windows per forward pass, sampled labels per token (Fisher),
    the seed of the label sampling, and whether to show a progress bar."""

    batch_size: int = 4
    label_samples: int = 2
    seed: int = 0
    progress: bool = True
    dtype: Optional[torch.dtype] = None  # the forwards under autocast to it and the hooks' products in it (``pass_dtype``)


def _products(g: torch.Tensor, x: torch.Tensor, dtype: Optional[torch.dtype], equation: Optional[str] = None):
    """G^T X (or ``equation`` of g and x) in ``dtype`` (None: float32), returned in float32 for the scoring
    that follows (a bfloat16 matrix-vector product is 10x slower than float32's on the CPU)."""
    dt = dtype or torch.float32
    with torch.autocast(g.device.type, enabled=False):
        if equation is None:
            return (g.reshape(-1, g.shape[-1]).to(dt).T @ x.reshape(-1, x.shape[-1]).to(dt)).float()
        return torch.einsum(equation, g.to(dt), x.to(dt)).float()


@dataclass
class _Hooks:
    """What a gradient pass calls: ``backward(ids)`` runs the forward pass and .backward();
    ``on_module(name, grad_out, input)`` fires for every module in ``modules``;
    ``on_layer(i, grad_out, delta)`` for every decoder layer with weights in ``layer_w`` (delta =
    the layer's output with those weights minus its live output)."""

    modules: Sequence[str]
    layer_w: Dict[int, Mapping]
    on_module: Callable
    on_layer: Callable
    backward: Callable


def _gradient_pass(model, windows: torch.Tensor, settings: PassSettings, hooks: _Hooks, desc: str,
                   absmax_windows: int = 0) -> Dict[str, torch.Tensor]:
    """The scaffolding the one-pass estimators share: every batch through ``hooks.backward`` with
    the module and layer hooks in place. Returns the hooked modules' input absmax over the batches that
    start within the first ``absmax_windows`` windows (on the host; {} for 0)."""
    state: Dict[str, object] = {}
    # allocated before the pass: running maxima allocated between a batch's activations and kept to the end held
    # the host heap apart (glibc keeps freed memory for reuse on the CPU), and the later trials took fresh memory
    absmax: Dict[str, torch.Tensor] = _absmax_buffers(model, hooks.modules) if absmax_windows else {}
    state["absmax_seen"] = set()  # the modules that saw an input (an expert no token reached did not)

    def layer_hook(i):
        return _layer_delta_hook(hooks.layer_w[i], state, lambda h_out, d, i=i: h_out.register_hook(
            lambda g: hooks.on_layer(i, g, d)))

    layer_ids = [i for i, w in hooks.layer_w.items() if w]
    with _gradient_hooks(model, hooks.modules, _input_grad_hook(state, hooks.on_module), layer_ids, layer_hook):
        for b, ids in enumerate(tqdm(list(windows.split(settings.batch_size)), desc=desc, unit="batch",
                                     disable=not settings.progress, leave=False)):
            state["absmax"] = absmax if b * settings.batch_size < absmax_windows else None
            hooks.backward(ids)
    return {n: t.cpu() for n, t in absmax.items() if n in state["absmax_seen"]}


def _absmax_buffers(model, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Zeros (an absmax is never below) per named module's input width, where its weight is (a module without
    an [out, in] weight gets its buffer at its first input)."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        w = getattr(mods[n], "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type != "meta":
            out[n] = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    return out


def _per_type(modules: Dict[str, float]) -> Dict[str, float]:
    types: Dict[str, float] = {}
    for n, v in modules.items():
        types[module_type(n)] = types.get(module_type(n), 0.0) + v
    return types


@dataclass
class FisherScope:
    """What a Fisher pass scores besides the options: the plan's modules (``plan_scores``) and its
    decoder layers (``layer_scores``, by rerunning each layer with the plan's weights); ``labels``
    ((batch, sample) -> sampled labels) is filled by a first pass and reused by later ones (the
    same labels the seeded generator would draw again; on the CPU drawing them from a 128k
    vocabulary took 2.2 s a batch)."""

    plan_scores: bool = True
    layer_scores: bool = True
    labels: Optional[dict] = None
    absmax_windows: int = 0  # the hooked modules' input absmax over this many first windows (``Sensitivity.absmax``)


class _FisherSums:
    """The running sums of one Fisher pass (kept on the device: one host copy at the end)."""

    def __init__(self, model, quantized, options, settings: PassSettings, scope: FisherScope):
        self.model, self.quantized, self.options, self.s, self.scope = model, quantized, options, settings, scope
        self.mods = dict(model.named_modules())
        self.mod: Dict[str, object] = {n: 0.0 for n in quantized} if scope.plan_scores else {}
        self.opt: Dict[str, Dict[str, object]] = {n: {k: 0.0 for k in o} for n, o in options.items()}
        self.layer_q = _layer_weights(model, quantized) if scope.layer_scores else {}
        self.layer: Dict[int, object] = {i: 0.0 for i, q in self.layer_q.items() if q}
        self.deltas = _DeltaCache()
        self.gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        self.n_tokens, self.batch = 0, 0
        self.dev = input_device(model)

    def on_module(self, name, g, x):
        # per sequence b, g_b . (x_b dW^T) = <dW, G_b^T X_b>: one [out, in] product per sequence
        # serves the plan and every option. An MoE expert sees its routed tokens flattened
        # ([tokens, features], sequences mixed): they count as one sequence
        if g.dim() == 2:
            g, x = g.unsqueeze(0), x.unsqueeze(0)
        M = _products(g, x, self.s.dtype, "blo,bli->boi")
        dev = M.device
        w = lambda: weight_of(self.mods[name]).to(dev).float()  # noqa: E731
        # float32 - a half option: promoted in the subtraction (the same values as .float() first, one pass less)
        deltas = {"__plan__": lambda: torch.sub(w(), self.quantized[name].to(dev))} if self.scope.plan_scores else {}
        for label, wo in self.options.get(name, {}).items():
            deltas[label] = lambda wo=wo: torch.sub(w(), wo.to(dev))
        for label, make in deltas.items():
            dW = self.deltas.get((name, label), dev, make)
            val = 0.5 * ((M.reshape(M.shape[0], -1) @ dW.reshape(-1)) ** 2).sum()  # per sequence
            if label == "__plan__":
                self.mod[name] = self.mod[name] + val
            else:
                self.opt[name][label] = self.opt[name][label] + val

    def on_layer(self, i, g, d):
        self.layer[i] = self.layer[i] + 0.5 * ((g.float() * d).sum(dim=(1, 2)) ** 2).sum()

    def backward(self, ids):
        with _autocast(self.model, self.s.dtype):
            logits = self.model(input_ids=ids.to(self.dev), use_cache=False).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        self.n_tokens += logp.shape[0] * logp.shape[1]
        b, self.batch = self.batch, self.batch + 1
        labels, k_all = self.scope.labels, self.s.label_samples
        drawn = [labels.get((b, k)) for k in range(k_all)] if labels is not None else [None] * k_all
        if any(y is None for y in drawn):  # sampled once; a later pass (same float model, same windows) reuses them
            drawn = self._draw(logp)
            if labels is not None:
                labels.update({(b, k): y for k, y in enumerate(drawn)})
        for k, y in enumerate(drawn):
            logp.gather(-1, y.to(logp.device)).sum().backward(retain_graph=k < k_all - 1)

    def _draw(self, logp) -> List[torch.Tensor]:
        """``label_samples`` labels per token, independent draws from the float model's distribution, one
        label at a time. (Both at once with replacement, an inverse-CDF draw, took 0.1 s instead of 2.2 s a
        batch of 2048 tokens x 49k on a 2-core CPU, but other draws move the Fisher scores and so the plans:
        the demo's seeded path then took a fourth trial, 17 s, in every run, and five or more with the passes in
        bfloat16 and that draw on the CPU only: benchmarks/README.md; kept as drawn. The same draw from
        exponential noise drawn in a thread during the forward, the same labels bit for bit: the Fisher pass
        18.6-19.6 -> 20.8-22.7 s, the serial generator's thread slowing the forward's two more than it saved.)"""
        probs = logp.detach().exp().reshape(-1, logp.shape[-1])
        if self.gen.device != probs.device:  # sample where the model runs (a device generator on CUDA)
            self.gen = torch.Generator(device=probs.device).manual_seed(self.s.seed)
        shape = (logp.shape[0], logp.shape[1], 1)
        return [torch.multinomial(probs, 1, generator=self.gen).view(shape) for _ in range(self.s.label_samples)]

    def result(self, seconds: float) -> "Sensitivity":
        norm = 1.0 / (self.s.label_samples * max(1, self.n_tokens))
        modules = {n: v * norm for n, v in _to_floats(self.mod).items()}
        return Sensitivity("fisher", {i: v * norm for i, v in _to_floats(self.layer).items()}, _per_type(modules),
                           modules, {n: {k: v * norm for k, v in _to_floats(o).items()} for n, o in self.opt.items()},
                           seconds, self.n_tokens)


@torch.enable_grad()
def fisher(model, windows: torch.Tensor, quantized: Dict[str, torch.Tensor],
           options: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, settings: PassSettings = PassSettings(),
           scope: FisherScope = FisherScope()) -> Sensitivity:
    """One-pass second-order estimate. ``model`` must hold the float weights; ``quantized`` maps
    module name -> its quantized (dequantized) weight; ``options`` maps module name -> label ->
    alternative quantized weight, scored in the same pass. Without ``scope.plan_scores`` only the
    options' modules are hooked (the plan's module scores are left out); without
    ``scope.layer_scores`` the decoder layers are not rerun with the plan's weights (no layer
    scores): a later pass over another chunk of options then costs one forward + backward and the
    chunk's own products."""
    t0 = time.perf_counter()
    options = options or {}
    sums = _FisherSums(model, quantized, options, settings, scope)
    hooked = list(quantized) if scope.plan_scores else [n for n in options if n in quantized]
    absmax = _gradient_pass(model, windows, settings, _Hooks(hooked, sums.layer_q, sums.on_module, sums.on_layer,
                                                             sums.backward), "sensitivity (fisher)", scope.absmax_windows)
    result = sums.result(time.perf_counter() - t0)
    if absmax:
        result.absmax, result.absmax_windows = {"float": absmax}, scope.absmax_windows
    return result


def fisher_chunks(model, windows: torch.Tensor, quantized: Dict[str, torch.Tensor], chunks,
                  settings: PassSettings = PassSettings(), layer_scores: bool = True, absmax_windows: int = 0) -> Sensitivity:
    """``fisher`` with the options given in chunks (an iterable of module -> label -> weight dicts):
    one pass per chunk, so the options' weights need not all be in memory at once. The plan's
    module scores (and with ``layer_scores`` the layers') come from the first pass; a later pass
    hooks only its chunk's modules (at 8B, 18 chunks each recomputing every module's product and
    rerunning every layer took 50 s a pass)."""
    result, labels = None, {}
    sim_s, passes = 0.0, 0
    t = time.perf_counter()
    for chunk in chunks:  # a generator: the chunk's options are simulated while it is fetched
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        sim_s += time.perf_counter() - t
        first = result is None
        f = fisher(model, windows, quantized, chunk, settings,
                   FisherScope(plan_scores=first, layer_scores=layer_scores and first, labels=labels,
                               absmax_windows=absmax_windows if first else 0))
        del chunk  # its weights go before the next chunk is simulated: one chunk in memory at a time
        passes += 1
        if first:
            result = f
        else:
            result.options.update(f.options)
            result.seconds += f.seconds
        t = time.perf_counter()
    if result is not None:
        result.parts = {"option simulation": sim_s, "fisher passes": result.seconds, "passes": passes}
    return result if result is not None else fisher(model, windows, quantized, {}, settings,
                                                    FisherScope(layer_scores=layer_scores, absmax_windows=absmax_windows))


def exact(evaluate_kld: Callable[[Sequence[str]], float], names: List[str], per_module: bool = False,
          progress: bool = True) -> Sensitivity:
    """The seed's method: restore each layer (each module type; optionally each module) to float
    and re-evaluate. ``evaluate_kld(restored_names)`` returns the mean KLD with those modules in float."""
    t0 = time.perf_counter()
    base = evaluate_kld(())
    by_layer: Dict[int, List[str]] = {}
    by_type: Dict[str, List[str]] = {}
    for n in names:
        if layer_index(n) is not None:
            by_layer.setdefault(layer_index(n), []).append(n)
        by_type.setdefault(module_type(n), []).append(n)
    parts = [("layer", k, v) for k, v in sorted(by_layer.items())] + [("type", k, v) for k, v in by_type.items()]
    if per_module:
        parts += [("module", n, [n]) for n in names]
    layers, types, modules = {}, {}, {}
    for kind, key, group in tqdm(parts, desc="sensitivity (exact)", unit="eval", disable=not progress):
        gain = base - evaluate_kld(group)
        {"layer": layers, "type": types, "module": modules}[kind][key] = gain
    return Sensitivity("exact", layers, types, modules, {}, time.perf_counter() - t0, 0)


@torch.enable_grad()
def taylor(model, windows: torch.Tensor, ref, float_weights: Dict[str, torch.Tensor],
           options: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
           settings: PassSettings = PassSettings(), absmax_windows: int = 0) -> Sensitivity:
    """First-order estimate of the seed's exact measurement, in one forward + backward pass of the
    quantized model. ``model`` must hold the quantized weights; ``float_weights`` maps each
    quantized module to its float weight. The mean KLD from the cached float reference is
    differentiated once; restoring part i changes its output by d_i (float layer/module on the
    same quantized-model input), so the KLD it removes is ~ -grad . d_i. Deterministic (no label
    sampling); ``options`` (module -> label -> weight) are scored in the same pass."""
    from quantfix.evaluate import _kld_rows

    t0 = time.perf_counter()
    options = options or {}
    mods = dict(model.named_modules())
    layer_fp = _layer_weights(model, float_weights)
    dev = input_device(model)
    acc_mod: Dict[str, object] = {n: 0.0 for n in float_weights}
    acc_opt: Dict[str, Dict[str, object]] = {n: {k: 0.0 for k in o} for n, o in options.items()}
    acc_layer: Dict[int, object] = {i: 0.0 for i, q in layer_fp.items() if q}
    weight_deltas = _DeltaCache()  # the live (quantized) weights do not change during the pass

    def on_module(name, g, x):
        # sum over tokens of g . (x dW^T) = <dW, G^T X>: one [out, in] product serves every option
        M = _products(g, x, settings.dtype)
        dev = M.device
        for label, w in {"__fp__": float_weights[name], **options.get(name, {})}.items():
            dW = weight_deltas.get((name, label), dev,
                                   lambda w=w: w.to(dev).float() - weight_of(mods[name]).to(dev).float())
            gain = -(M * dW).sum()  # KLD removed by moving this module to `label`
            if label == "__fp__":
                acc_mod[name] = acc_mod[name] + gain
            else:
                acc_opt[name][label] = acc_opt[name][label] + gain

    def on_layer(i, g, d):
        acc_layer[i] = acc_layer[i] - (g.float() * d).sum()

    rows = [0]
    total = windows.shape[0] * (windows.shape[1] - 1)

    def backward(ids):
        with _autocast(model, settings.dtype):
            logits = model(input_ids=ids.to(dev), use_cache=False).logits[:, :-1].float()
        q_logp = F.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        sl = slice(rows[0], rows[0] + q_logp.shape[0])
        rows[0] += q_logp.shape[0]
        (_kld_rows(ref, sl, q_logp).sum() / total).backward()  # the mean KLD over all windows

    absmax = _gradient_pass(model, windows, settings, _Hooks(list(float_weights), layer_fp, on_module, on_layer,
                                                             backward), "sensitivity (taylor)", absmax_windows)
    modules = _to_floats(acc_mod)
    # per option: the contribution that remains at that option (what the planner consumes)
    opts = {n: {k: max(modules[n] - v, 0.0) for k, v in _to_floats(o).items()} for n, o in acc_opt.items()}
    return Sensitivity("taylor", dict(_to_floats(acc_layer)), _per_type(modules), modules, opts,
                       time.perf_counter() - t0, rows[0], absmax={"quantized": absmax} if absmax else {},
                       absmax_windows=absmax_windows if absmax else 0)


def fast(model, windows: torch.Tensor, ref, float_weights: Dict[str, torch.Tensor],
         quantized: Dict[str, torch.Tensor], settings: PassSettings = PassSettings(),
         fisher_windows: Optional[torch.Tensor] = None, option_chunks=None) -> Sensitivity:
    """The default. Layers, module types and single modules by the one-pass Taylor estimate of the
    seed's exact measurement (on the demo model, 6 windows in bfloat16: layer Spearman 0.93 against
    exact at 26x less wall time, see benchmarks/); each module's precision options (``option_chunks``: an
    iterable of module -> label -> weight dicts, one Fisher pass each, float context) by Fisher,
    which predicted plans better than Taylor in the repair loop (``options_scored``). ``model``
    holds the quantized weights on entry and the float ones on exit."""
    t0 = time.perf_counter()
    fw = windows if fisher_windows is None else fisher_windows
    k = shared_windows(windows, fw, settings.batch_size)
    t = taylor(model, windows, ref, float_weights, None, settings, absmax_windows=k)
    s = options_scored(model, t, float_weights, quantized, settings, fw, option_chunks, absmax_windows=k)
    s.seconds, s.parts["taylor"] = time.perf_counter() - t0, t.seconds
    if "float" in s.absmax and t.absmax:
        s.absmax["quantized"], s.absmax_windows = t.absmax["quantized"], k
    else:
        s.absmax, s.absmax_windows = {}, 0
    return s


def shared_windows(windows: torch.Tensor, other: torch.Tensor, batch_size: int) -> int:
    """How many first windows two passes both run, in whole batches of ``batch_size`` (0: none)."""
    n = min(len(windows), len(other))
    n -= n % max(1, batch_size)
    return n if n and torch.equal(windows[:n], other[:n]) else 0


def options_scored(model, plan_scores: Sensitivity, float_weights: Dict[str, torch.Tensor],
                   quantized: Dict[str, torch.Tensor], settings: PassSettings, windows: torch.Tensor,
                   option_chunks=None, absmax_windows: int = 0) -> Sensitivity:
    """``plan_scores``' layers, module types and modules (Taylor's, of the ``quantized`` weights) with
    each module's precision options scored by Fisher on ``windows``, the float weights live (set here,
    left live). Alone, after a recalibration: the plan's weights unchanged, its options not."""
    t0 = time.perf_counter()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for n, w in float_weights.items():
            set_weight(mods[n], w)
    opts, base, parts, absmax = {}, {}, {}, {}
    chunks = option_chunks if option_chunks is not None else []
    if chunks:
        f = fisher_chunks(model, windows, quantized, chunks, settings, layer_scores=False,  # layers: Taylor's
                          absmax_windows=absmax_windows)
        opts, base, parts, absmax = f.options, f.modules, f.parts, f.absmax
    return Sensitivity(method="fast", layers=plan_scores.layers, types=plan_scores.types, modules=plan_scores.modules,
                       options=opts, seconds=time.perf_counter() - t0, n_tokens=plan_scores.n_tokens, option_base=base,
                       parts={"taylor": 0.0, **parts}, absmax=dict(absmax), absmax_windows=absmax_windows if absmax else 0)
