"""The recipe: set up -> (baseline | diagnose | repair) -> finish.

repair: plan 0 from ``quant`` -> trial (simulated quantization, evaluated against the cached float
reference) -> if it fails, diagnose it and search (``search``) for the smallest passing plan ->
export the chosen plan with the real engine -> reload it from disk -> verify -> report.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from omegaconf import OmegaConf

from quantfix import arch
from quantfix import evaluate as ev
from quantfix import export as exp
from quantfix import report as rep
from quantfix import search, steps, verdict
from quantfix.errors import QuantfixError
from quantfix.weights import input_device
from quantfix.planner import Ladder, initial_plan, ladder_options
from quantfix.quantize import algorithms
from quantfix.bank import WeightBank
from quantfix.session import Session
from quantfix.trials import Trials, TrialSetup

log = logging.getLogger(__name__)


def run(cfg, out_dir: Path) -> Dict[str, Any]:
    """Run ``cfg.mode`` and write the run dir; returns report.json's content. A run that fails once
    under way (an error, an interrupt, a bug) still writes report.json with ``final.stop_reason``,
    then the exception goes on to the CLI, which maps it to the exit code; input refused while
    the session is set up (config, model, data) writes none."""
    t_start = time.perf_counter()
    _check_writable(out_dir)
    exp.clean_stale_temp(out_dir)
    report: Dict[str, Any] = {"model": cfg.model.name_or_path, "config": OmegaConf.to_container(cfg, resolve=True),
                              "iterations": [], "warnings": []}
    s = None
    try:
        s = Session(cfg, out_dir)
        diagnosis = _run_mode(s, report)
    except BaseException as e:
        if s is not None or not isinstance(e, QuantfixError):
            _write_failure(report, out_dir, e, s, t_start)
        raise
    return _finish(s, report, t_start, diagnosis)


def _run_mode(s: Session, report: Dict[str, Any]):
    cfg = s.cfg
    alg = algorithms.get(cfg.quant.algorithm)
    if alg.export_needs_cuda and cfg.export.enabled and cfg.mode == "repair" and s.device.type != "cuda":
        raise QuantfixError(f"quant={alg.name} exports through llm-compressor's {alg.name.upper()}, which needs a CUDA "
                            "device (it fails on the CPU): run with device=cuda, pick quant=gptq, or set "
                            "export.enabled=false")
    blocker = arch.export_blocker(s.rt.model) if cfg.export.enabled and cfg.mode == "repair" else None
    if blocker:
        raise QuantfixError(f"{blocker}: run with export.enabled=false (the trials and the diagnosis work), or "
                            "mode=diagnose")
    report.update(model_path=s.resolved.path, device=str(s.device), dtype=str(s.dtype))
    ref = s.reference()
    base = ev.baseline_metrics(ref)
    report["baseline"] = base.to_dict()
    _check_baseline(s, base, report)
    log.info("float baseline: PPL %.3f on %d tokens of %s", base.ppl, base.n_tokens, cfg.eval.source)
    placement = getattr(s.rt.model, "hf_device_map", None)
    if placement and len(set(map(str, placement.values()))) > 1:  # spread by accelerate: say where
        report["placement"] = dict(Counter(str(v) for v in placement.values()))
        log.info("device map: %s", ", ".join(f"{n} modules on {d}" for d, n in report["placement"].items()))
    return MODES[cfg.mode](s, ref, base, report)


def _check_baseline(s: Session, base, report: Dict[str, Any]) -> None:
    """The float model must give finite log-probs (else nothing can be measured against it); one
    worse than a uniform guess over its vocabulary is said loudly (random weights, wrong text)."""
    if not math.isfinite(base.nll):
        where = ev.locate_nonfinite(s.rt.model, s.data.windows[:1])
        raise QuantfixError(f"the float model gives non-finite log-probs: its mean NLL on the eval windows is "
                            f"{base.nll}" + (f"; non-finite values start at {where}" if where else "") +
                            "; check the model's weights (a NaN/Inf value) or load it in float32 (model.dtype=float32)")
    vocab = s.rt.model.get_output_embeddings().weight.shape[0]
    if base.ppl > vocab:
        msg = (f"the float model's PPL {base.ppl:.1f} is worse than a uniform guess over its {vocab}-token vocabulary: "
               f"it looks untrained, or {s.cfg.eval.source} is not text it models; its quantization results mean "
               "little")
        log.warning("%s", msg)
        report["warnings"].append(msg)
    repeated = _greedy_repeats(s)
    if repeated is not None:
        token, text = repeated
        msg = (f"the float model's greedy continuation of an eval window is one token repeated ({text!r}, token "
               f"{token}): the tokenizer may not match the weights (a converted GGUF tokenizer, a missing BOS) or the "
               "model is broken; its quantization results mean little")
        log.warning("%s", msg)
        report["warnings"].append(msg)


GREEDY_PROMPT, GREEDY_NEW = 32, 16


@torch.no_grad()
def _greedy_repeats(s: Session):
    """(token id, decoded text) when the float model's greedy continuation (GREEDY_NEW tokens) of
    the first eval window's first GREEDY_PROMPT tokens is a single token repeated, else None."""
    window = s.data.windows[0, :GREEDY_PROMPT].unsqueeze(0).to(input_device(s.rt.model))
    new = []
    ids = window
    for _ in range(GREEDY_NEW):
        nxt = s.rt.model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(nxt))
        ids = torch.cat([ids, nxt], dim=1)
    if len(set(new)) != 1:
        return None
    return new[0], s.rt.tokenizer.decode(new)


def _write_failure(report: Dict[str, Any], out_dir: Path, e: BaseException, s, t_start: float) -> None:
    """report.json of a run that stopped: the stop reason (the error's line, "interrupted", or the
    internal error's type) and whatever was measured until then; never masks the exception."""
    if isinstance(e, QuantfixError):
        reason = str(e)
    elif isinstance(e, KeyboardInterrupt):
        reason = "interrupted"
    else:
        reason = f"internal error: {type(e).__name__}"
    fin = report.get("final") or {}
    fin.update(passed=False, stop_reason=reason, trials=len(report["iterations"]))
    report["final"] = fin
    report["timings_s"] = dict(s.timer.stages if s is not None else {}, total=round(time.perf_counter() - t_start, 2))
    try:
        rep.write_json(report, out_dir)
    except Exception as err:  # noqa: BLE001 - the original error is what the user needs to see
        log.warning("could not write report.json after the failure: %s", err)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-test").touch()
        (out_dir / ".write-test").unlink()
    except OSError as e:
        raise QuantfixError(f"cannot write the output directory {out_dir} ({e.strerror}): "
                            "pick a writable hydra.run.dir or output_dir") from e


def _baseline(s: Session, ref, base, report) -> None:
    report["final"] = None


def _setup_trials(s: Session, base, report):
    """Plan 0, calibration statistics, the weight bank and the trial runner."""
    cfg = s.cfg
    calibration = {"domains": list(cfg.data.domains), "n_samples": cfg.data.n_samples, "seq_len": cfg.data.seq_len,
                   "seed": cfg.data.seed}
    plan0, warnings = initial_plan(s.rt.model, cfg.quant, calibration)
    report["warnings"] += warnings
    report["baseline_size_bytes"] = int(16 * (plan0.n_params + plan0.other_params) / 8)
    report["ppl_limit"] = verdict.ppl_limit(base, cfg.thresholds)
    report["kld_limit"] = cfg.thresholds.max_kld_mean
    task_base = s.task_baseline() if cfg.eval.tasks else {}
    if task_base:
        report["baseline_tasks"] = {t: r.to_dict() for t, r in task_base.items()}
    export_dtype, warning = s.export_dtype()
    if warning:
        log.warning("%s", warning)
        report["warnings"].append(warning)
    report["export_dtype"] = str(export_dtype).replace("torch.", "")
    s.emulate_export_dtype(export_dtype)  # the trials measure the weights the checkpoint will hold
    stats = s.calib_stats(list(plan0.modules))
    q = cfg.quant
    bank = WeightBank(s.rt.model, list(plan0.modules), stats, q.gptq_dampening, q.gptq_block_size, q.awq_grid,
                      q.llm_int8_threshold, sim_dtype=export_dtype)
    if cfg.quantized.name_or_path:  # plan 0 is an existing checkpoint: its scheme and its own weights
        plan0 = _load_external(s, plan0, bank, report)
    setup = TrialSetup(bank, lambda desc: s.evaluate(desc=desc), base, cfg.thresholds, cfg.loop.max_iters,
                       s.out_dir / "trials.jsonl", cfg.loop.resume, s.timer, task_base, s.task_results,
                       fingerprint=s.fingerprint, warnings=report["warnings"],
                       locate_nonfinite=lambda: ev.locate_nonfinite(s.rt.model, s.data.windows[:1]))
    return plan0, stats, bank, Trials(setup, report["iterations"])


def _load_external(s: Session, plan0, bank, report):
    """Read ``quantized.name_or_path`` (any format ``formats`` reads) as plan 0 and hand its
    dequantized weights to the bank; the diagnosis then treats its calibration set as unknown."""
    from quantfix import formats

    path = s.cfg.quantized.name_or_path
    with s.timer("read checkpoint"):
        ext = formats.read(path, plan0, s.rt.model)
    bank.use_external(ext.weights, ext.qparams)
    s.data.external_checkpoint = True
    s.external = ext
    approx = sum(1 for p in ext.plan.modules.values() if p.algorithm == "ckpt_approx")
    report["quantized"] = {"path": path, "format": ext.format, "summary": ext.summary(), "notes": ext.notes,
                           "modules_exact_grid": sum(1 for p in ext.plan.modules.values() if p.algorithm == "ckpt"),
                           "modules_approx_grid": approx}
    log.info("existing checkpoint: %s", ext.summary())
    if approx:
        msg = (f"{approx} modules of {path} use a grid compressed-tensors cannot store exactly ({ext.format}: a float "
               "minimum or non-uniform levels): the diagnosis measures them as downloaded; the repair's trials measure "
               "the ones a plan keeps re-rounded to the nearest integer grid, as the export writes them")
        report["warnings"].append(msg)
    return dataclasses.replace(ext.plan, calibration={"checkpoint": path, "format": ext.format})


def _diagnose_only(s: Session, ref, base, report):
    plan0, stats, bank, trial = _setup_trials(s, base, report)
    trial(plan0)
    diagnosis = None
    if verdict.nonfinite(trial.last_metrics):  # the diagnosis compares finite outputs: nothing to measure
        msg = "plan 0 gives non-finite values: not diagnosed (its failed list names where they start)"
        log.warning("%s", msg)
        report["warnings"].append(msg)
    else:
        diagnosis = steps.diagnose(s, bank, plan0, ref, base, trial.last_metrics, stats, None, report)
    bank.restore()
    report["final"] = None
    return diagnosis


def _reround_kept(s: Session, bank, trial, plan0, report) -> int:
    """From here on the trials measure an existing checkpoint's approximate-grid modules (NF4, ...)
    as the export re-rounds them, not as downloaded: a plan that keeps them is judged on what ships
    (the diagnosis above described the download). Returns the modules changed."""
    changed = bank.reround_external(plan0)
    if changed:
        trial.context += "; ckpt_approx re-rounded"  # the same plan now measures differently
        report.setdefault("quantized", {})["modules_rerounded_for_trials"] = len(changed)
        log.info("%d approximate-grid checkpoint modules: trials measure them re-rounded to the grid the export "
                 "writes", len(changed))
    return len(changed)


def _repair(s: Session, ref, base, report):
    cfg = s.cfg
    plan0, stats, bank, trial = _setup_trials(s, base, report)
    diagnosis = None
    fails0 = trial(plan0)
    if not fails0 and cfg.plan.budget.avg_bits is None and _reround_kept(s, bank, trial, plan0, report):
        fails0 = trial(plan0, fresh=True)  # the checkpoint passed as downloaded: does it as exported?
    if not fails0 and cfg.plan.budget.avg_bits is None:
        result = search.SearchResult(plan0, plan0, "plan 0 passed")
    elif verdict.nonfinite(trial.last_metrics):  # no diagnosis or error ranking works from NaN/Inf
        result = search.SearchResult(None, plan0, "plan 0 gives non-finite values, so no search from it (quant.ignore "
                                                  "can keep the module named below in float)")
    elif cfg.loop.policy == "greedy":
        _reround_kept(s, bank, trial, plan0, report)
        result = search.greedy(trial, plan0, cfg.loop, bank.output_error, s.timer)
    else:
        options = ladder_options(plan0, Ladder.parse(list(cfg.loop.ladder)), list(cfg.loop.algorithms))
        diagnosis = steps.diagnose(s, bank, plan0, ref, base, trial.last_metrics, stats, options, report)
        diagnosis = steps.recalibrate_on_domain_gap(s, bank, trial, plan0, options, diagnosis, ref, base, report)
        _reround_kept(s, bank, trial, plan0, report)
        result = search.predictive(trial, plan0, diagnosis, options, cfg.thresholds, cfg.plan.budget.avg_bits, s.timer)
        result = steps.tune(s, bank, trial, result, cfg.plan.budget.avg_bits)
    chosen = result.chosen
    if result.best is None and report["iterations"]:
        result.reason += "; the last trial failed on: " + "; ".join(report["iterations"][-1]["failed"])
    chosen.save(s.out_dir / "plan.yaml")
    report["pareto"] = {"measured": [[it["avg_bits"], it["metrics"]["kld_mean"], it["metrics"]["ppl"]]
                                     for it in report["iterations"]]}
    if result.frontier:
        report["pareto"]["predicted"] = [[round(b, 4), round(k, 6)] for b, k in result.frontier]
    static = bank.export_tensors(chosen) if cfg.export.enabled else {}  # what the trials measured, to ship
    bank.restore()
    bank.release()  # the float copies and kept simulations: the export and the reload need the memory
    del bank
    report["final"] = {"plan": "plan.yaml", "plan_summary": chosen.summary_str(), "avg_bits": round(chosen.avg_bits, 4),
                       "size_bytes": chosen.size_bytes, "search_passed": result.best is not None,
                       "stop_reason": result.reason, "trials": len(report["iterations"])}
    if cfg.export.enabled:
        steps.export_and_verify(s, chosen, base, trial.setup.task_base, report, static)
    else:
        report["final"]["passed"] = result.best is not None
    ext = getattr(s, "external", None)
    if ext is not None and ext.format == "gguf":  # the fix in llama.cpp's own toolchain
        from quantfix.formats import gguf_io

        path = gguf_io.write_overrides(chosen, ext, s.out_dir, cfg.quantized.name_or_path, cfg.model.name_or_path)
        report["final"]["llama_quantize_overrides"] = str(path)
    return diagnosis


MODES: Dict[str, Callable] = {"baseline": _baseline, "diagnose": _diagnose_only, "repair": _repair}


def _finish(s: Session, report: Dict[str, Any], t_start: float, diagnosis=None) -> Dict[str, Any]:
    report["timings_s"] = dict(s.timer.stages, total=round(time.perf_counter() - t_start, 2))
    report["memory"] = dict(ev.peak_memory_mb(s.device), stages=s.timer.memory)
    report["eval_batch_size"] = s.rt.batch_size
    rep.write_json(report, s.out_dir)
    if report["iterations"]:
        rep.plot_iterations(report, s.out_dir)
    rep.write_human(report, s.out_dir, diagnosis)
    print("\n" + rep.table(report) if report["iterations"] else f"\nfloat baseline PPL {report['baseline']['ppl']:.3f}")
    fin = report.get("final")
    if fin:
        print(f"\nresult: {'PASSED' if fin.get('passed') else 'FAILED'} ({fin['stop_reason']}); "
              f"{fin['trials']} trials; plan {fin['plan_summary']}")
        if fin.get("checkpoint"):
            print(f"checkpoint: {fin['checkpoint']} ({fin['checkpoint_bytes'] / 1e6:.1f} MB)")
    print(f"run dir: {s.out_dir}")
    return report
