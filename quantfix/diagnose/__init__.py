"""Stage: diagnose. Where and why a quantized plan breaks, and what fixes it.

``run`` measures (sensitivity, outliers, per-channel error, probes, per-domain perplexity) and
returns a ``Diagnosis``; ``rules.root_causes`` turns the measurements into findings, each with its
evidence numbers and a fix the planner can act on; ``plots`` draws them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from quantfix.cache import CACHE_VERSION, atomic_write, load_entry
from quantfix import data as data_mod
from quantfix.timing import memory_now_gb, memory_rise
from quantfix.config import DiagnoseConfig, ProbesConfig, SensitivityConfig
from quantfix.diagnose import activations, probes, sensitivity
from quantfix.diagnose.findings import Diagnosis, Finding
from quantfix.diagnose.sensitivity import pass_dtype
from quantfix.diagnose.plots import plot_diagnosis
from quantfix.diagnose.rules import root_causes
from quantfix.plan import Plan, Precision, layer_index
from quantfix.runtime import RunData, Runtime

__all__ = ["Diagnosis", "Files", "Finding", "Subject", "run", "measure_sensitivity", "sensitivity_cache_key",
           "pass_dtype"]
log = logging.getLogger(__name__)
Options = Dict[str, Dict[str, Precision]]


def sensitivity_cache_key(model_fp: str, plan: Plan, windows: torch.Tensor, scfg: SensitivityConfig,
                          options: Optional[Options], weights_key: str, dtype: Optional[torch.dtype] = None) -> str:
    """Key of a sensitivity measurement: the float model's content fingerprint, the plan and every
    option's precision, the eval windows, the method, and ``weights_key``: what else decides the
    quantized weights (calibration samples, algorithm settings, the fingerprint of an existing
    checkpoint whose weights are diagnosed), so two plans with the same labels but other weights
    never share an entry; ``dtype``: the dtype the passes compute in (``pass_dtype``)."""
    opts = {n: {lab: asdict(p) for lab, p in o.items()} for n, o in sorted((options or {}).items())}
    h = hashlib.sha256(f"sens-v{CACHE_VERSION}|{model_fp}|{weights_key}|{scfg.method}|{scfg.windows}|"
                       f"{scfg.label_samples}|{scfg.fisher_windows}|{dtype}".encode())
    h.update(json.dumps(plan.to_dict()["modules"], sort_keys=True).encode())
    h.update(json.dumps(opts, sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()[:16]


def measure_sensitivity(rt: Runtime, bank, subject: "Subject", windows: torch.Tensor, scfg: SensitivityConfig,
                        cache_path: Optional[Path] = None, progress: bool = True,
                        plan_scores: Optional[sensitivity.Sensitivity] = None) -> sensitivity.Sensitivity:
    """Sensitivity of the subject plan's parts (cached at ``cache_path``), its precision options
    (``subject.options``: module -> label -> precision) scored too (fast / taylor / fisher).
    ``plan_scores`` (fast): the plan's own scores, measured before on the same weights: only the
    options are scored. Leaves the float weights live."""
    cached = load_entry(cache_path, lambda b: sensitivity.Sensitivity.from_dict(json.loads(b))) \
        if cache_path is not None else None
    if cached is not None:
        log.info("sensitivity: cached (%s)", cache_path.name)
        bank.restore()
        return cached
    plan, ref, options = subject.plan, subject.reference, subject.options or {}
    settings = sensitivity.PassSettings(min(2, rt.batch_size), scfg.label_samples, rt.seed, progress,
                                        pass_dtype(scfg.dtype, rt.model))
    if scfg.method == "exact":
        result = _exact(rt, bank, plan, ref, windows, scfg, progress)
    elif scfg.method == "fast" and plan_scores is not None:  # the float model scores the options
        bank.restore()
        result = sensitivity.options_scored(rt.model, plan_scores, bank.float_weights(plan), bank.quantized_weights(plan),
                                            settings, windows[: scfg.fisher_windows],
                                            option_chunks(bank, options, scfg.options_memory_gb))
    elif scfg.method in ("fast", "taylor"):
        opts = bank.simulate_options(options) if scfg.method == "taylor" else None
        bank.apply(plan, progress=False)
        fw, sub = bank.float_weights(plan), windows[: scfg.windows]
        if scfg.method == "fast":
            result = sensitivity.fast(rt.model, sub, ref, fw, bank.quantized_weights(plan), settings,
                                      fisher_windows=windows[: scfg.fisher_windows],
                                      option_chunks=option_chunks(bank, options, scfg.options_memory_gb))
            bank.forget_applied()  # fast() leaves the float weights live
        else:
            result = sensitivity.taylor(rt.model, sub, ref, fw, opts, settings)
    else:
        qw = bank.quantized_weights(plan)
        bank.restore()
        result = sensitivity.fisher_chunks(rt.model, windows[: scfg.windows], qw,
                                           option_chunks(bank, options, scfg.options_memory_gb), settings)
    bank.restore()
    if cache_path is not None:
        atomic_write(cache_path, lambda tmp: tmp.write_text(json.dumps(result.cache_dict())))
    return result


def option_chunks(bank, options: Options, memory_gb: float):
    """The options' simulated weights, a chunk of modules at a time, each chunk's weights within
    ``memory_gb`` (a module's options stay together). One chunk: the bank keeps them for the
    trials. More: each chunk is computed where the model runs (the accelerator), scored and
    dropped, never copied to the host; the trials recompute the few options a plan picks."""
    budget = memory_gb * 2 ** 30
    chunks, current, used = [], {}, 0
    for n, o in options.items():
        size = bank.option_bytes(n, len(o))
        if current and used + size > budget:
            chunks.append(current)
            current, used = {}, 0
        current[n] = o
        used += size
    if current:
        chunks.append(current)
    if len(chunks) > 1:
        log.info("precision options: %d Fisher passes (their weights exceed diagnose.sensitivity.options_memory_gb=%g)",
                 len(chunks), memory_gb)
    for chunk in chunks:
        yield bank.simulate_options(chunk, keep=len(chunks) == 1)


def _exact(rt: Runtime, bank, plan: Plan, ref, windows: torch.Tensor, scfg: SensitivityConfig,
           progress: bool) -> sensitivity.Sensitivity:
    from quantfix import evaluate as ev

    def kld(restored):
        bank.apply(plan.with_changes({n: Precision() for n in restored}), progress=False)
        return rt.batched(lambda bs: ev.evaluate(rt.model, windows, ref, bs, progress=False)).kld_mean

    quantized = [n for n, p in plan.modules.items() if not p.is_float]
    return sensitivity.exact(kld, quantized, scfg.per_module_exact, progress)


@dataclass
class Subject:
    """What a diagnosis looks at: ``plan`` (applied through the bank) and its measured ``metrics``,
    against the float model's ``reference`` log-probs and ``base`` metrics; ``stats`` are the
    calibration statistics, ``options`` the precision options the planner may choose (scored too)."""

    plan: Plan
    metrics: Any
    reference: Any
    base: Any
    stats: Any = None
    options: Optional[Options] = None


@dataclass
class Files:
    """Where a diagnosis writes: its plots, and its sensitivity measurement's cache entry."""

    plots: Path
    sensitivity_cache: Optional[Path] = None
    progress: bool = True


def run(cfg: DiagnoseConfig, probes_cfg: ProbesConfig, rt: Runtime, data: RunData, bank, subject: Subject,
        files: Files, earlier: Optional[Diagnosis] = None) -> Diagnosis:
    """Full diagnosis of ``subject.plan`` (applied through ``bank``) against the float model. Writes
    plots under ``files.plots``; leaves the plan applied. ``earlier``: a diagnosis of the same quantized
    weights, taken before the options changed (a recalibration: plan 0 in a rounding that reads no
    calibration data is the same model, its options are not); only the options are measured again
    (``_options_again``)."""
    if earlier is not None and earlier.sides is not None and cfg.sensitivity.method == "fast":
        return _options_again(cfg, rt, data, bank, subject, files, earlier)
    t0 = time.perf_counter()
    plan, progress = subject.plan, files.progress
    parts = _Laps()
    sens = measure_sensitivity(rt, bank, subject, data.windows, cfg.sensitivity, files.sensitivity_cache, progress)
    parts.lap("sensitivity")
    parts.timings.update({f"sensitivity: {k}": round(v, 2) for k, v in sens.parts.items()})
    names = [n for n, p in plan.modules.items() if not p.is_float]
    by_eval = _eval_domains(cfg, data)
    side = _Side(rt, data, cfg, names, _domain_windows(rt, data, cfg, by_eval),
                 [asdict(p) if not isinstance(p, dict) else dict(p) for p in probes_cfg.prompts] if cfg.probes else [],
                 probes_cfg.max_new_tokens, progress, by_eval)
    # float side (the bank is restored: float weights live), then the quantized side
    known_fp, known_q = _known_absmax(sens, subject, names, data.samples[: cfg.absmax_samples])
    fp = side.measure(channels_of=bank.quantized_weights(plan), known_absmax=known_fp)
    parts.lap("float side (activations, channels, probes, domains)")
    bank.apply(plan, progress=False)
    q = side.measure(domain_refs=fp["domains"], known_absmax=known_q)
    parts.lap("quantized side (activations, probes, domains)")
    diag = _assemble(subject, sens, (fp, q), side, bank)
    diag.plots["histograms"] = activations.plot_histograms(
        fp["absmax"], q["absmax"], histogram_inputs(diag.outliers, cfg.histograms), files.plots, cfg.outlier_k)
    diag.findings = root_causes(diag, cfg)
    diag.plots.update(plot_diagnosis(diag, files.plots))
    diag.sides = {"domain_windows": side.domain_sets, "domain_refs": fp["domains"], "prompts": side.prompts,
                  "float_generations": fp["gen"], "max_new_tokens": side.max_new_tokens,
                  "eval_domains": side.eval_domains}
    diag.timings_s = dict(parts.timings, total=round(time.perf_counter() - t0, 2))
    diag.memory_gb = parts.memory
    return diag


def _known_absmax(sens, subject: Subject, names: List[str], samples: torch.Tensor):
    """(float, quantized) input absmax already measured: both sides from the sensitivity passes' own
    forwards on the same first eval windows (``fast``: Fisher's float model, Taylor's quantized one) when
    they cover every module; else the float side over the first calibration samples from the calibration
    pass, where it holds it, and the quantized side measured on those samples ({})."""
    both = sens.absmax.get("float", {}), sens.absmax.get("quantized", {})
    if all(n in both[0] and n in both[1] for n in names):
        return {n: both[0][n] for n in names}, {n: both[1][n] for n in names}
    return (subject.stats.head_absmax(names, samples) if subject.stats is not None else {}), {}


def _options_again(cfg: DiagnoseConfig, rt: Runtime, data: RunData, bank, subject: Subject, files: Files,
                   earlier: Diagnosis) -> Diagnosis:
    """``earlier`` with the precision options simulated and scored again (Fisher) and the findings
    read again with the calibration domains of now. What depends on the plan's weights alone (Taylor's
    layer and module scores, outliers, per-channel error, domains, probes) is the same model measured
    again: kept (the demo's budget-3.43 row from W3g64 on a 2-core CPU: 177 -> 119 s, the same trials to the digit)."""
    t0 = time.perf_counter()
    sens = measure_sensitivity(rt, bank, subject, data.windows, cfg.sensitivity, files.sensitivity_cache, files.progress,
                               plan_scores=earlier.sensitivity)
    bank.apply(subject.plan, progress=False)
    diag = replace(earlier, sensitivity=sens, findings=[], plots=dict(earlier.plots),
                   calibration_domains=[] if data.external_checkpoint else list(data.calibration_domains))
    diag.findings = root_causes(diag, cfg)
    diag.timings_s = {"sensitivity": round(sens.seconds, 2),
                      **{f"sensitivity: {k}": round(v, 2) for k, v in sens.parts.items()},
                      "the plan's own measurements: kept from the diagnosis before": 0.0,
                      "total": round(time.perf_counter() - t0, 2)}
    diag.memory_gb = {}
    return diag


class _Laps:
    """Seconds and the memory snapshot per part of the diagnosis."""

    def __init__(self):
        self.t = time.perf_counter()
        self.timings: Dict[str, float] = {}
        self.memory: Dict[str, Dict[str, float]] = {}
        self.last = memory_now_gb()

    def lap(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t, 2)
        now = memory_now_gb()
        self.memory[name], self.last = memory_rise(self.last, dict(now)), now
        self.t = time.perf_counter()


def _assemble(subject: Subject, sens, sides, side: "_Side", bank) -> Diagnosis:
    """The Diagnosis of the measurements (``sides``: the float and the quantized side's); findings
    and plots are added by ``run``."""
    plan, base, qmetrics = subject.plan, subject.base, subject.metrics
    (fp, q), rt, data, cfg = sides, side.rt, side.data, side.cfg
    outliers = _outlier_rows(fp["absmax"], q["absmax"], subject.stats, side.names, sens, cfg.outlier_k)
    domains = {k: probes.domain_metrics(w, fp["domains"][k], q["domains"][k]) for k, w in side.domain_sets.items()}
    domains.update({k: probes.eval_domain_metrics(base, qmetrics) for k in side.eval_domains})
    return Diagnosis(
        plan_summary=plan.summary_str(), avg_bits=round(plan.avg_bits, 4),
        metrics={"baseline": base.to_dict(), "quantized": qmetrics.to_dict(),
                 "ppl_increase_pct": round(100 * (qmetrics.ppl / base.ppl - 1), 3)},
        sensitivity=sens, outliers=outliers, channel_errors={str(k): v for k, v in fp["channels"].items()},
        domains={k: domains[k] for k in cfg.domains if k in domains},
        generations=probes.compare_generations(rt.tokenizer, side.prompts, fp["gen"], q["gen"]) if side.prompts else [],
        calibration_domains=[] if data.external_checkpoint else list(data.calibration_domains),
        plots={}, eval_source=data.eval_source,
        calibration_check=_calibration_check(rt, data, bank, plan, subject.reference, qmetrics),
        routing=_routing(fp.get("routes") or {}, q.get("routes") or {}, sens.modules))


def _calibration_check(rt: Runtime, data: RunData, bank, plan: Plan, ref, qmetrics) -> Dict[str, Any]:
    """When the plan's algorithms learn from the calibration data: the same widths in plain RTN,
    measured on the eval windows (one evaluation). Calibration that does no better than none is the
    signature of calibration data unlike the deployment text. Leaves the plan applied."""
    from quantfix import evaluate as ev

    external = data.external_checkpoint  # how it was made is unknown: RTN at its own scheme is the reference
    calibrated = {n: p for n, p in plan.modules.items() if not p.is_float and
                  (external or p.alg.learns_from_data)}
    if not calibrated:
        return {}
    if external:  # the bank serves the checkpoint's own weights for these precisions: RTN afresh
        bank.apply_rtn(calibrated)
    else:
        bank.apply(plan.with_changes({n: Precision(p.bits, p.group_size, p.symmetric, "rtn")
                                      for n, p in calibrated.items()}), progress=False)
    algs = ["the checkpoint"] if external else sorted({p.algorithm for p in calibrated.values()})
    m = rt.batched(lambda bs: ev.evaluate(rt.model, data.windows, ref, bs, progress=False))
    bank.apply(plan, progress=False)
    return {"kld": round(qmetrics.kld_mean, 6), "rtn_kld": round(m.kld_mean, 6), "algorithms": algs}


def _eval_domains(cfg: DiagnoseConfig, data: RunData) -> List[str]:
    """The domains whose text is the eval's: the eval windows (from the same text's start, 8x the
    domain's tokens at the defaults) measure them, with the float reference and the plan's trial
    (a pass per side fewer: 6 s of the CPU demo's run)."""
    return [label for label, src in cfg.domains.items() if src == data.eval_source]


def _domain_windows(rt: Runtime, data: RunData, cfg: DiagnoseConfig, skip: List[str]) -> Dict[str, torch.Tensor]:
    """Each domain's windows (the first ``domain_windows`` x ``domain_seq_len`` tokens of its text),
    but those in ``skip`` (measured by the eval)."""
    out = {}
    for label, src in cfg.domains.items():
        if label in skip:
            continue
        try:
            out[label] = data_mod.eval_windows(src, data.data_dir, rt.tokenizer, cfg.domain_windows, cfg.domain_seq_len,
                                               offline=data.offline)
        except Exception as e:  # a missing optional corpus should not stop the diagnosis
            log.warning("domain %s (%s) skipped: %s", label, src, e)
    return out


@dataclass
class _Side:
    """The measurements taken once with the float weights live and once with the plan's: input
    absmax, per-domain references (or metrics against them), routes and probe generations."""

    rt: Runtime
    data: RunData
    cfg: DiagnoseConfig
    names: List[str]
    domain_sets: Dict[str, torch.Tensor]
    prompts: List[dict]
    max_new_tokens: int
    progress: bool
    eval_domains: List[str] = field(default_factory=list)  # measured by the eval windows, not in domain_sets

    def measure(self, channels_of: Optional[Dict[str, torch.Tensor]] = None,
                domain_refs: Optional[Dict[str, Any]] = None,
                known_absmax: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
        """The model as it is now; with ``channels_of`` (the quantized weights; float model live)
        also the per-channel output error; with ``domain_refs``, per-domain metrics against them.
        ``known_absmax``: input absmax already measured for this model on the same samples (the
        others are measured here; none left: no pass)."""
        rt, data, cfg, bs = self.rt, self.data, self.cfg, self.rt.batch_size
        absmax = dict(known_absmax or {})
        rest = [n for n in self.names if n not in absmax]
        if rest:
            absmax.update(activations.input_absmax(rt.model, data.samples[: cfg.absmax_samples], rest, bs,
                                                   self.progress))
        out: Dict[str, Any] = {"absmax": absmax}
        if channels_of is not None:
            out["channels"] = activations.channel_errors(rt.model, data.windows[: cfg.channel_windows], channels_of, bs,
                                                         self.progress)
        out["domains"] = {k: probes.domain_reference(rt.model, w, bs) if domain_refs is None else
                          probes.domain_eval(rt.model, w, domain_refs[k], bs) for k, w in self.domain_sets.items()}
        out["routes"] = _routes(rt.model, data.windows[: cfg.channel_windows])
        out["gen"] = probes.generate(rt.model, rt.tokenizer, self.prompts, self.max_new_tokens, self.progress) \
            if self.prompts else []
        return out


@torch.no_grad()
def _routes(model, windows: torch.Tensor) -> Dict[int, torch.Tensor]:
    """MoE: decoder layer -> the experts each token of ``windows`` is routed to ([tokens, k], sorted),
    read from the routers' outputs (the integer tensor of top-k indices they return); {} otherwise."""
    from quantfix.arch import ROUTER, decoder_layers, layer_index, module_role

    if not any(module_role(n) == ROUTER for n, _ in model.named_modules()):
        return {}
    names = {id(m): n for n, m in model.named_modules() if module_role(n) == ROUTER and layer_index(n) is not None}
    found: Dict[int, List[torch.Tensor]] = {}

    def hook(mod, _args, out):
        idx = [t for t in (out if isinstance(out, (tuple, list)) else [out])
               if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2]
        if idx:
            found.setdefault(layer_index(names[id(mod)]), []).append(idx[-1].sort(dim=-1).values.cpu())

    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) in names]
    try:
        if handles and len(decoder_layers(model)):
            from quantfix.weights import input_device

            for ids in windows.split(2):
                model(input_ids=ids.to(input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in found.items()}


def _routing(fp: Dict[int, torch.Tensor], q: Dict[int, torch.Tensor], module_sens: Dict[str, float]) -> Dict[str, Any]:
    """Share of tokens whose top-k expert set changes per layer, and the most sensitive experts."""
    import re

    if not fp:
        return {}
    layers = {i: round(float((fp[i] != q[i]).any(dim=-1).float().mean()), 4)
              for i in sorted(fp) if i in q and fp[i].shape == q[i].shape}
    experts: Dict[str, float] = {}
    for n, v in module_sens.items():
        m = re.search(r"^(.*\.experts\.\d+)\.", n)
        if m:
            experts[m.group(1)] = experts.get(m.group(1), 0.0) + v
    top = sorted(experts.items(), key=lambda kv: -kv[1])[:5]
    return {"layers": layers, "mean": round(sum(layers.values()) / max(1, len(layers)), 4),
            "experts": [{"expert": k, "kld": round(v, 6)} for k, v in top]}


def _outlier_rows(fp_absmax, q_absmax, stats, names: List[str], sens, k: float) -> List[Dict[str, Any]]:
    """Outlier summary per distinct input (q/k/v share one), float and quantized, largest ratio first."""
    groups = stats.groups() if stats is not None else {n: [n] for n in names}
    rows = []
    for members in groups.values():
        members = [m for m in members if m in fp_absmax]
        if not members:
            continue
        o = activations.outlier_summary(fp_absmax[members[0]], k)
        oq = activations.outlier_summary(q_absmax[members[0]], k) if members[0] in q_absmax else None
        rows.append({"input_of": members, "layer": layer_index(members[0]), "float": o, "quantized": oq,
                     "sensitivity": sum(sens.modules.get(m, 0.0) for m in members)})
    rows.sort(key=lambda r: -r["float"]["ratio"])
    return rows


def histogram_inputs(outliers: List[Dict[str, Any]], k: int) -> List[str]:
    """The inputs to draw (one module named per input): the largest max/median ratios and the most
    sensitive inputs, alternately, ``k`` in all. By ratio alone the demo drew layer 9's input
    (54x, 1.5% of the sensitivity) and not layer 29 down_proj's (54x too, 51 outlier channels,
    10% of the sensitivity: the most sensitive module)."""
    by_ratio = [r["input_of"][0] for r in outliers]  # the rows come largest ratio first
    by_sens = [r["input_of"][0] for r in sorted(outliers, key=lambda r: -r["sensitivity"])]
    out: List[str] = []
    for pair in zip(by_ratio, by_sens):
        for name in pair:
            if len(out) < k and name not in out:
                out.append(name)
    return out


def measure_like(diag: Diagnosis, model, tokenizer, batch_size: int,
                 evals: Optional[Tuple[Any, Any]] = None) -> Dict[str, Any]:
    """Another model (the shipped checkpoint) measured as the diagnosis measured plan 0: per-domain
    perplexity and KLD against the same float references, probe generations against the float
    model's. ``evals``: (the float reference's, the model's) Metrics on the eval windows, which
    measure the domains of the eval's own text. {} when the diagnosis was replayed from its journal
    (the references are not kept)."""
    s = diag.sides
    if not s:
        return {}
    domains = {k: probes.domain_metrics(w, s["domain_refs"][k], probes.domain_eval(model, w, s["domain_refs"][k],
                                                                                   batch_size))
               for k, w in s["domain_windows"].items()}
    if evals is not None:
        domains.update({k: probes.eval_domain_metrics(*evals) for k in s.get("eval_domains", [])})
    domains = {k: domains[k] for k in [*diag.domains, *domains] if k in domains}  # the diagnosis's order
    gens = []
    if s["prompts"]:
        ids = probes.generate(model, tokenizer, s["prompts"], s["max_new_tokens"], progress=False)
        gens = probes.compare_generations(tokenizer, s["prompts"], s["float_generations"], ids)
    return {"domains": domains, "generations": gens}
