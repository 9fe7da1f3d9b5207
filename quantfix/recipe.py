"""The recipe: the one owner of a run. set up -> (baseline | diagnose | repair) -> finish.

repair: plan 0 (from ``quant``, or an existing checkpoint) -> trial (simulated quantization,
evaluated against the cached float reference) -> if it fails, diagnose it and search for the
smallest passing plan (or the best within a budget) -> optionally tune it -> export the chosen plan
with the real engine -> reload it from disk -> verify -> report.

Every piece of run state lives on ``Recipe``: the config, the model and data, the caches' keys,
the weight bank, the trials and the ``RunReport``. Stages are functions (and the ``Trials`` and
``WeightBank`` objects the recipe owns) that take what they need as arguments and return typed
results; none of them writes the report.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from quantfix import arch, cache as cache_mod, data as data_mod, evaluate as ev, export as exp, loading, report as rep
from quantfix import calib, explain, gguf_export, gguf_plan, search, source, verdict, verify, weights
from quantfix.bank import WeightBank
from quantfix.calib import CalibStats
from quantfix.budget import BudgetSearch, prune_ladder
from quantfix.config import Config, gguf_mode, ladder_of, validate
from quantfix.diagnose import Diagnosis, Files, Subject, measure_like, pass_dtype, sensitivity_cache_key
from quantfix.diagnose import journal as diagnose_journal
from quantfix.diagnose import run as run_diagnosis
from quantfix.errors import QuantfixError
from quantfix.existing import ExistingCheckpoint
from quantfix.plan import Plan, Precision
from quantfix.planner import Ladder, group_problem, initial_plan, ladder_options
from quantfix.quantize import algorithms
from quantfix.runreport import DiagnosisSummary, ExistingInfo, Outcome, Recalibration, RunReport, TrialRecord
from quantfix.runtime import RunData, Runtime, keep_freed_host_memory
from quantfix.timing import Timer, peak_memory_mb
from quantfix.trials import Trials, TrialSetup, plan_key

log = logging.getLogger(__name__)


def run(cfg, out_dir: Path) -> RunReport:
    """Run ``cfg.mode`` and write the run dir; returns the report. A run that fails once under way
    (an error, an interrupt, a bug) still writes report.json with ``final.stop_reason``, then the
    exception goes on to the CLI, which maps it to the exit code; input refused while the run is
    set up (config, model, data) writes none."""
    recipe = Recipe(cfg, out_dir)
    try:
        recipe.setup()
        recipe.run()
    except BaseException as e:
        recipe.fail(e)
        raise
    return recipe.finish()


def typed(cfg) -> Config:
    """The composed config as its dataclasses (choices as enums); a Config passes through."""
    return OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg


class Recipe:
    """One run: ``setup`` (device, model, data, fingerprints, float reference), ``run`` (the mode),
    ``finish`` (report.json, plots, report.md/html, the console summary) or ``fail``."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg: Config = typed(cfg)
        self.out_dir = Path(out_dir)
        self.timer = Timer()
        self.t_start = time.perf_counter()
        container = OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True, enum_to_str=True)
        self.report = RunReport(model=self.cfg.model.name_or_path, config=container)
        self.set_up = False  # input refused before this is bad input: no report.json
        self.trials: Optional[Trials] = None
        self.bank: Optional[WeightBank] = None
        self.existing: Optional[ExistingCheckpoint] = None
        self.diagnosis: Optional[Diagnosis] = None
        self.sim_dtype: Optional[torch.dtype] = None  # the dtype the trials round weights in (the export's)
        # GGUF mode: plans in llama.cpp types, the eval windows are llama-perplexity's chunks, a GGUF ships
        self.gguf = gguf_mode(self.cfg)
        self.llama: Optional[gguf_export.LlamaSide] = None

    # ---- set up ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        validate(cfg)
        _check_writable(self.out_dir)
        exp.clean_stale_temp(self.out_dir)
        self._runtime()
        self._load()
        self._check_run_dir()
        if cfg.mode != "baseline":
            problem = group_problem(self.rt.model, cfg.quant, ladder_of(cfg))
            if problem:
                raise QuantfixError(problem)
        self.set_up = True
        self._check_exportable()
        self.reference = self._reference()
        self.base = ev.baseline_metrics(self.reference, cfg.eval.seq_len - 1, self._skip())
        self.report.baseline = self.base
        self._check_baseline()
        log.info("float baseline: PPL %.3f on %d tokens of %s", self.base.ppl, self.base.n_tokens, cfg.eval.source)
        placement = getattr(self.rt.model, "hf_device_map", None)
        if placement and len(set(map(str, placement.values()))) > 1:  # spread by accelerate: say where
            self.report.placement = dict(Counter(str(v) for v in placement.values()))
            log.info("device map: %s", ", ".join(f"{n} modules on {d}" for d, n in self.report.placement.items()))

    def _runtime(self) -> None:
        """Threads, seed, device, dtype, cache and offline mode."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = loading.resolve_device(cfg.device)
        if cfg.device_memory_gb and torch.cuda.is_available():
            weights.cap_device_memory(cfg.device_memory_gb)
        if self.device.type == "cpu":
            # statistics of inputs with massive activations (the demo's 3000x channels) underflow into
            # denormal floats in the clipping searches and GPTQ, which the CPU computes ~15x slower
            # (one demo down_proj: 13.2 s -> 0.9 s); flushed to zero they change nothing measurable. Set
            # before any torch worker thread starts (they inherit it); the bank's simulation jobs set it too
            torch.set_flush_denormal(True)
            if cfg.host_memory_reuse:
                keep_freed_host_memory()
        self.dtype = loading.resolve_dtype(cfg.model.dtype, self.device)
        self.sim_dtype = self.dtype
        self.cache = cache_mod.cache_dir(cfg.cache_dir)
        self.offline = source.is_offline(cfg.offline)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _load(self) -> None:
        """The float model, the eval windows and calibration samples, the content fingerprints."""
        cfg, m = self.cfg, self.cfg.model
        data_dir = str(data_mod.default_data_dir(cfg.data_dir))
        with self.timer("load model"):
            self.resolved = source.resolve(m.name_or_path, self.cache, offline=self.offline, revision=m.revision)
            model, tokenizer = loading.load(self.resolved, self.dtype, self.device, m, offline=self.offline)
        loading.check_positions(model.config, {  # the diagnosis (not in mode=baseline) has its own length
            "eval.seq_len": cfg.eval.seq_len, "data.seq_len": cfg.data.seq_len,
            **({} if cfg.mode == "baseline" else {"diagnose.domain_seq_len": cfg.diagnose.domain_seq_len})})
        with self.timer("data"):
            windows = self._eval_windows(tokenizer, data_dir)
            samples = data_mod.calibration_samples(list(cfg.data.domains), data_dir, tokenizer, cfg.data.n_samples,
                                                   cfg.data.seq_len, cfg.data.seed, offline=self.offline,
                                                   holdout=self._holdout())
        with self.timer("fingerprint"):  # content keys of every cache entry and of the resume journal
            self.model_fp = cache_mod.model_fingerprint(self.resolved.path, m.revision)
            q = cfg.quantized.name_or_path
            self.quantized_fp = (cache_mod.model_fingerprint(q) if Path(q).is_dir() else
                                 cache_mod.file_digest(Path(q)) if Path(q).is_file() else None) if q else None
            self.fingerprint = self._run_fingerprint(windows, samples)
        self.report.fingerprint = self.fingerprint
        # eval.batch_size=0 (auto): 4 on the CPU; on CUDA as many windows as fit, up to 32
        bs = cfg.eval.batch_size or (min(cfg.eval.n_windows, 32) if self.device.type == "cuda" else 4)
        self.rt = Runtime(model, tokenizer, self.device, bs, cfg.seed)
        self.data = RunData(windows, samples, data_dir, tuple(cfg.data.domains), self.offline, cfg.eval.source)
        self.report.model_path, self.report.device, self.report.dtype = self.resolved.path, str(self.device), str(self.dtype)

    def _check_run_dir(self) -> None:
        """A run dir that holds a finished run takes only a resume of that same run (its fingerprint:
        same model, data, settings and code), never a second run beside it (a folder that mixes two
        runs' report, plan and checkpoint)."""
        prior = prior_run(self.out_dir)
        if prior is None or not prior[1]:
            return  # a new dir, or an interrupted run: resume replays its own trials and ignores the rest
        if not self.cfg.loop.resume:
            raise QuantfixError(f"{self.out_dir} holds a finished run: pick a new hydra.run.dir=<dir> (or "
                                "loop.resume=true with that run's settings to verify it again)")
        if prior[0] != self.fingerprint:
            raise QuantfixError(f"{self.out_dir} holds a finished run of another model, data or config (loop.resume "
                                "replays only its own run): use a new run dir, hydra.run.dir=<dir>")

    def _check_exportable(self) -> None:
        """Refuse before any measurement what the export could not write."""
        cfg = self.cfg
        if cfg.mode != "repair" or not cfg.export.enabled or self.gguf:  # GGUF: llama-quantize writes any model
            return
        if self.device.type != "cuda" and algorithms.get(cfg.quant.algorithm).export_needs_cuda:
            raise QuantfixError(f"quant={cfg.quant.algorithm} exports through llm-compressor's "
                                f"{str(cfg.quant.algorithm).upper()}, which needs a CUDA device (it fails on the CPU): "
                                "run with device=cuda, pick quant=gptq, or set export.enabled=false")
        blocker = arch.export_blocker(self.rt.model)
        if blocker:
            raise QuantfixError(f"{blocker}: run with export.enabled=false (the trials and the diagnosis work), or "
                                "mode=diagnose")

    def _run_fingerprint(self, windows: torch.Tensor, samples: torch.Tensor) -> str:
        """What a journaled trial or diagnosis depends on: model and checkpoint content, eval windows,
        calibration samples, dtype and device, thresholds, loop / quant / eval / diagnose settings
        and the code. ``loop.resume`` and ``loop.max_iters`` are left out: a resumed run may go on
        for more iterations."""
        c = self.report.config
        loop = {k: v for k, v in c["loop"].items() if k not in ("resume", "max_iters")}
        return cache_mod.digest({
            "model": self.model_fp, "quantized": self.quantized_fp, "windows": cache_mod.tensor_digest(windows),
            "samples": cache_mod.tensor_digest(samples), "dtype": str(self.dtype), "device": self.device.type,
            "thresholds": c["thresholds"], "loop": loop, "quant": c["quant"], "eval": c["eval"], "data": c["data"],
            "diagnose": c["diagnose"], "probes": c["probes"], "plan": c["plan"], "seed": c["seed"],
            "code": cache_mod.code_version()})[:20]

    def _weights_key(self) -> str:
        """What decides the quantized weights besides the float model and the plan: the calibration
        samples in use (they change on recalibration), the algorithm settings, and the content of an
        existing checkpoint whose weights are diagnosed (``quantized.name_or_path``)."""
        q = self.cfg.quant
        return cache_mod.digest({
            "samples": cache_mod.tensor_digest(self.data.samples), "quantized": self.quantized_fp,
            "knobs": [q.gptq_dampening, q.gptq_block_size, q.awq_grid, q.llm_int8_threshold],
            "dtype": str(self.dtype), "sim_dtype": str(self.sim_dtype), "device": self.device.type})[:20]

    def _holdout(self) -> Dict[str, int]:
        """Calibration never sees the eval windows (the first n_windows x seq_len tokens of eval.source)."""
        return {self.cfg.eval.source: self.cfg.eval.n_windows * self.cfg.eval.seq_len}

    def _reference(self) -> ev.Reference:
        """The float model's log-probs on the eval windows (cached on disk); sets the evaluator."""
        e = self.cfg.eval
        key = ev.cache_key(self.model_fp, self.data.windows, e.topk, e.full_max_mb, self.dtype)
        with self.timer("float reference"):
            ref = self.rt.batched(lambda bs: ev.reference(self.rt.model, self.data.windows, bs, e.topk, e.full_max_mb,
                                                          cache_path=self.cache / "reference" / f"{key}.pt"))
        self.evaluator = ev.Evaluator(ref, compile=e.compile, skip=self._skip())
        return ref

    def _check_baseline(self) -> None:
        """The float model must give finite log-probs (else nothing can be measured against it); one
        worse than a uniform guess over its vocabulary, or whose greedy continuation is one token
        repeated, is said loudly."""
        base, model = self.base, self.rt.model
        if not math.isfinite(base.nll):
            where = ev.locate_nonfinite(model, self.data.windows[:1])
            raise QuantfixError(f"the float model gives non-finite log-probs: its mean NLL on the eval windows is "
                                f"{base.nll}" + (f"; non-finite values start at {where}" if where else "") +
                                "; check the model's weights (a NaN/Inf value) or load it in float32 (model.dtype=float32)")
        vocab = model.get_output_embeddings().weight.shape[0]
        if base.ppl > vocab:
            self._warn(f"the float model's PPL {base.ppl:.1f} is worse than a uniform guess over its {vocab}-token "
                       f"vocabulary: it looks untrained, or {self.cfg.eval.source} is not text it models; its "
                       "quantization results mean little")
        repeated = ev.greedy_repeats(model, self.rt.tokenizer, self.data.windows[0])
        if repeated is not None:
            token, text = repeated
            self._warn(f"the float model's greedy continuation of an eval window is one token repeated ({text!r}, "
                       f"token {token}): the tokenizer may not match the weights (a converted GGUF tokenizer, a missing "
                       "BOS) or the model is broken; its quantization results mean little")

    def _warn(self, msg: str) -> None:
        log.warning("%s", msg)
        self.report.warnings.append(msg)

    # ---- modes -------------------------------------------------------------------------------
    def run(self) -> None:
        mode = self.cfg.mode
        if mode == "diagnose":
            self._diagnose_only()
        elif mode == "repair":
            self._repair()

    def _diagnose_only(self) -> None:
        plan0 = self._setup_trials()
        rec = self._plan0_trial(plan0)
        if verdict.nonfinite(rec.metrics):  # the diagnosis compares finite outputs: nothing to measure
            self._warn("plan 0 gives non-finite values: not diagnosed (its failed list names where they start)")
        else:
            self.diagnosis = self._diagnose(plan0, rec, None)
        self.bank.restore()

    def _repair(self) -> None:
        cfg = self.cfg
        budget = cfg.plan.budget.avg_bits
        plan0 = self._setup_trials()
        rec = self._plan0_trial(plan0)
        if not rec.failed and budget is None and self._reround_kept(plan0):
            rec = self.trials(plan0, fresh=True)  # the checkpoint passed as downloaded: does it as exported?
        if not rec.failed and budget is None:
            result = search.SearchResult(rec, rec, "plan 0 passed")
        elif verdict.nonfinite(rec.metrics):  # no diagnosis or error ranking works from NaN/Inf
            result = search.SearchResult(None, rec, "plan 0 gives non-finite values, so no search from it "
                                                    "(quant.ignore can keep the module named below in float)")
        elif cfg.loop.policy == "greedy":
            self._reround_kept(plan0)
            result = search.greedy(self.trials, plan0, ladder_of(cfg), cfg.loop, self.bank.output_error, self.timer)
        else:
            result = self._predictive(plan0, rec)
        if result.best is None and self.trials.records:
            result.reason += "; the last trial failed on: " + "; ".join(self.trials.last.failed)
        self._ship(result)

    def _predictive(self, plan0: Plan, rec: TrialRecord) -> search.SearchResult:
        """Diagnose plan 0, recalibrate on a domain gap, search, tune."""
        cfg, budget = self.cfg, self.cfg.plan.budget.avg_bits
        if self.gguf:
            options = gguf_plan.ladder_options(plan0, [str(t).upper() for t in cfg.loop.gguf_ladder])
        else:
            rungs = ladder_of(cfg) if budget is None else prune_ladder(ladder_of(cfg), budget)
            ladder = Ladder.parse(rungs)
            options = ladder_options(plan0, ladder, [str(a) for a in cfg.loop.algorithms], below=budget is not None)
        self.diagnosis = self._diagnose(plan0, rec, options)
        plan0, start = self._recalibrate_on_domain_gap(plan0, rec, options)
        self._reround_kept(plan0)
        if budget is None or self.gguf:  # a GGUF budget: the lowest predicted KLD in llama.cpp's types
            goal = search.Goal(cfg.thresholds, budget, cfg.loop.refine_misses)
            result = search.predictive(self.trials, plan0, self.diagnosis, options, goal, self.timer, start=start)
        else:
            with self.timer("plan"):
                searcher = self._budget_search(plan0, options, start)
            result = searcher.run()
        return self._tune(self._sequential(result))

    def _budget_search(self, plan0: Plan, options, start: TrialRecord) -> BudgetSearch:
        """Budget mode's search from ``plan0`` (measured as ``start``) with the diagnosis in place."""
        cfg, budget = self.cfg, self.cfg.plan.budget.avg_bits
        ladder = Ladder.parse(prune_ladder(ladder_of(cfg), budget))
        return BudgetSearch(self.trials, plan0, self.diagnosis, options, budget, ladder,
                            0 if cfg.loop.tune == "none" else 1, start=start)

    # ---- the pieces of a repair ------------------------------------------------------------------
    def _setup_trials(self) -> Plan:
        """Plan 0, calibration statistics, the weight bank and the trial runner."""
        cfg = self.cfg
        calibration = {"domains": list(cfg.data.domains), "n_samples": cfg.data.n_samples, "seq_len": cfg.data.seq_len,
                       "seed": cfg.data.seed}
        plan0, warnings = initial_plan(self.rt.model, cfg.quant, calibration)
        if self.gguf:  # llama.cpp types, as llama-quantize writes them on each module's rows; token_embd too
            plan0 = gguf_plan.to_gguf(plan0)
            q = cfg.quant
            plan0 = gguf_plan.with_tied_output(plan0, self.rt.model, gguf_plan.asked_type(
                Precision(q.bits, 0, q.symmetric, str(q.algorithm))))
            if cfg.quantized.name_or_path:  # a GGUF download: its types are plan 0 (read before any calibration)
                plan0 = self._gguf_download(plan0)
            else:
                self._check_gguf_budget(plan0)
        self.report.warnings += warnings
        self.report.baseline_size_bytes = int(16 * (plan0.n_params + plan0.other_params) / 8)
        self.report.ppl_limit = verdict.ppl_limit(self.base, cfg.thresholds)
        self.report.kld_limit = cfg.thresholds.max_kld_mean
        self.task_base = self._task_baseline() if cfg.eval.tasks else {}
        if self.task_base:
            self.report.baseline_tasks = {t: r.to_dict() for t, r in self.task_base.items()}
        export_dtype, warning = exp.choose_dtype(self.rt.model, self.dtype, str(cfg.export.dtype))
        if warning:
            self._warn(warning)
        self.report.export_dtype = str(export_dtype).replace("torch.", "")
        self._emulate_export_dtype(export_dtype)  # the trials measure the weights the checkpoint will hold
        self.stats = self._calib_stats(list(plan0.modules))
        q = cfg.quant
        self.bank = WeightBank(self.rt.model, list(plan0.modules), self.stats, q.gptq_dampening, q.gptq_block_size,
                               q.awq_grid, q.llm_int8_threshold, sim_dtype=export_dtype)
        if cfg.quantized.name_or_path and not self.gguf:  # an existing checkpoint: its scheme, its own weights
            plan0 = self._load_existing(plan0)
        setup = TrialSetup(self.bank, lambda desc: self._evaluate(desc=desc), self.base, cfg.thresholds,
                           cfg.loop.max_iters, self.out_dir / "trials.jsonl", cfg.loop.resume, self.timer,
                           self.task_base, self._task_results, fingerprint=self.fingerprint,
                           locate_nonfinite=lambda: ev.locate_nonfinite(self.rt.model, self.data.windows[:1]))
        self.trials = Trials(setup)
        return plan0

    def _check_gguf_budget(self, plan0: Plan) -> None:
        if self.cfg.mode != "repair":  # a diagnosis searches nothing
            return
        problem = gguf_plan.budget_problem(plan0, self.cfg.plan.budget.avg_bits)
        if problem:
            raise QuantfixError(problem)

    def _plan0_trial(self, plan0: Plan) -> TrialRecord:
        """Plan 0 measured. An existing checkpoint is also held against plain RTN at its own widths
        (one more evaluation): one whose KLD and top-1 say it behaves like another model fails,
        whatever its perplexity says (``verdict.different_model``)."""
        rec = self.trials(plan0)
        if self.existing is None or verdict.nonfinite(rec.metrics):
            return rec
        quantized = {n: p for n, p in plan0.modules.items() if not p.is_float}
        self.bank.apply_rtn(quantized)
        with self.timer("evaluate trials"):
            rtn = self._evaluate(desc="plain RTN at the checkpoint's widths")
        self.bank.apply(plan0, progress=False)
        problem = verdict.different_model(rec.metrics, rtn)
        if problem:
            self._warn(f"{self.existing.path} {problem}")
            rec.failed.append(f"the checkpoint {problem.split(':')[0]}")
        return rec

    def _gguf_download(self, template: Plan) -> Plan:
        """GGUF mode repairing a downloaded GGUF: plan 0 is every tensor at its downloaded type, as
        llama-quantize writes it from the F16 parent with quantfix's imatrix (what a GGUF-mode plan
        measures and ships); the download itself is measured by llama-perplexity for the report."""
        path = str(self.cfg.quantized.name_or_path)
        names = gguf_export.module_names(self.llama.f16, template.modules)
        types, notes = gguf_export.download_types(path, self.llama.f16, names)
        plan0 = template.with_changes({n: gguf_plan.precision(t, template.shapes[n][1]) for n, t in types.items()},
                                      note=f"the types of {Path(path).name}, re-quantized from the float parent "
                                           "with quantfix's imatrix")
        self._check_gguf_budget(plan0)  # before the download's own measurement
        with self.timer("llama-perplexity: the download"):
            measured = gguf_export.measure(Path(path), self.llama)
        self.report.quantized = ExistingInfo(path, "gguf", ", ".join(gguf_plan.summary(types)), notes,
                                             llama_perplexity=measured)
        log.info("the download %s: llama-perplexity KLD %.5f, PPL %.3f (F16 parent %.3f)", Path(path).name,
                 measured["kld_mean"], measured["ppl"], measured["ppl_base"])
        return plan0

    def _load_existing(self, template: Plan) -> Plan:
        """``quantized.name_or_path`` as plan 0: its scheme, its own weights served by the bank; the
        diagnosis then treats its calibration set as unknown."""
        with self.timer("read checkpoint"):
            self.existing = ExistingCheckpoint.read(self.cfg.quantized.name_or_path, template, self.rt.model)
        self.existing.serve(self.bank)
        self.data.external_checkpoint = True
        self.report.quantized = self.existing.info
        for w in self.existing.warnings:
            self._warn(w)
        return self.existing.plan0

    def _reround_kept(self, plan0: Plan) -> int:
        """From here on the trials measure an existing checkpoint's approximate-grid modules (NF4, ...)
        as the export re-rounds them, not as downloaded (the diagnosis described the download)."""
        changed = self.existing.reround_for_trials(self.bank, plan0) if self.existing is not None else 0
        if changed:
            self.trials.vary("ckpt_approx re-rounded")  # the same plan now measures differently
        return changed

    def _diagnose(self, plan: Plan, rec: TrialRecord, options, journal: str = "diagnosis_full.json",
                  plots: str = "plots", publish: bool = True, earlier: Optional[Diagnosis] = None) -> Diagnosis:
        """The diagnosis of ``plan`` (replayed from ``journal`` on resume), its plots in ``plots``; with
        ``publish``, written to diagnosis.json and the report (``_publish``: once it is the one acted on).
        ``earlier``: the diagnosis of the same weights before the options changed (only they are measured)."""
        saved = self.out_dir / journal
        diag = None
        if self.cfg.loop.resume:
            diag, warning = diagnose_journal.load(saved, self.fingerprint)
            if warning:
                self._warn(warning)
        if diag is None:
            scfg = self.cfg.diagnose.sensitivity
            key = sensitivity_cache_key(self.model_fp, plan, self.data.windows, scfg, options, self._weights_key(),
                                        pass_dtype(scfg.dtype, self.rt.model))
            subject = Subject(plan, rec.metrics, self.reference, self.base, self.stats, options)
            files = Files(self.out_dir / plots, self.cache / "sensitivity" / f"{key}.json")
            with self.timer("diagnose"):
                diag = run_diagnosis(self.cfg.diagnose, self.cfg.probes, self.rt, self.data, self.bank, subject, files,
                                     earlier)
            diagnose_journal.save(saved, diag, self.fingerprint)
        return self._publish(diag) if publish else diag

    def _publish(self, diag: Diagnosis) -> Diagnosis:
        """``diag`` into diagnosis.json and the report's diagnosis summary."""
        (self.out_dir / "diagnosis.json").write_text(json.dumps(diag.to_dict(with_options=False), indent=2, default=str))
        self.report.diagnosis = DiagnosisSummary(
            findings=[f.to_dict() for f in diag.findings], top_layers=diag.top_layers(5),
            sensitivity_method=diag.sensitivity.method, sensitivity_seconds=diag.sensitivity.seconds,
            domains=diag.domains, plots=diag.plots)
        return diag

    def _recalibrate_on_domain_gap(self, plan0: Plan, rec0: TrialRecord, options) -> Tuple[Plan, TrialRecord]:
        """The action for a calibration_mismatch or domain_gap finding: calibrate on the deployment
        text (held out from the eval windows) or the missing domain too, re-measure plan 0 when its
        algorithm learns from the calibration data, and diagnose again (the options' scores depend
        on the statistics). Returns plan 0 with the calibration it is now measured with, and its trial.

        A missing domain is a hypothesis, so it is measured: plan 0 when calibrated, else plan 0's widths in
        each calibrated algorithm of loop.algorithms, before and after, the best compared. When the best KLD
        on the eval windows does not drop the calibration goes back: a gap read off a broken plan 0 can name
        a domain that only dilutes the data (Gemma-3-270M from W3g64 RTN: uniform W4g64 GPTQ 0.153 -> 0.208;
        the demo from W3g64 RTN with HumanEval added: imatrix 1.216 -> 1.184, GPTQ 0.873 -> 0.945, the
        3.43-bit plans 0.52 -> 0.68 when imatrix alone judged). calibration_mismatch is not judged. Budget
        mode judges a domain gap by its search's first plans (``_recalibrate_judged_by_the_search``)."""
        findings = self.diagnosis.findings
        gap = next((f for f in findings if f.kind == "calibration_mismatch"), None) or \
            next((f for f in findings if f.kind == "domain_gap"), None)
        calibrated = any(p.alg.calibrated for o in [plan0.modules] + list(options.values())
                         for p in o.values() if not p.is_float)
        if gap is None or not self.cfg.loop.recalibrate or not calibrated or gap.source in self.data.calibration_domains:
            return plan0, rec0
        if gap.kind == "domain_gap" and self.cfg.plan.budget.avg_bits is not None and not self.gguf:
            return self._recalibrate_judged_by_the_search(plan0, rec0, options, gap)
        before = list(self.data.calibration_domains)
        old = (self.stats, self.data.samples, self.data.calibration_domains)
        probes = self._calibrated_probes(plan0)
        judged = gap.kind == "domain_gap" and bool(probes)  # the deployment text itself is not judged
        own = bool(probes) and probes[0] is plan0  # plan 0 learns from the data: its own probe
        names = ["plan 0" if own else getattr(p, "note", "") for p in probes]
        befores = [rec0]
        if judged and not own:
            self.trials.grant(2 * len(probes))  # measurements the search does not pay for
            befores = self._measure_probes(probes, names, gap.kind)
        log.info("domain gap (%s): recalibrating on %s too", gap.domain, gap.source)
        self.stats = self._recalibrate(gap.source)
        aside = self.bank.use_stats(self.stats)  # served again if the recalibration is undone
        action = f"recalibrate: data.domains {before} + {gap.source}"
        self.report.recalibration = r = Recalibration(gap.finding, before, list(self.data.calibration_domains),
                                                      self.diagnosis.domains)
        context = self.trials.vary("calibration: " + ", ".join(self.data.calibration_domains))
        rec = self.trials(plan0.with_changes({}, note=action), action=action, drivers={gap.kind: 1}) if own else rec0
        afters = [rec] if own else (self._measure_probes(probes, names, gap.kind) if judged else [])
        if judged:
            kld = lambda recs: min(x.metrics.kld_mean for x in recs)  # noqa: E731
            r.kld_before, r.kld_after = kld(befores), kld(afters)
            r.probe = names[0] if len(names) == 1 else "the best of " + " / ".join(names)
            if not Recalibration.pays(r.kld_before, r.kld_after):  # no better: the old calibration stays
                r.kept = False
                self.stats, self.data.samples, self.data.calibration_domains = old
                self.bank.use_stats(self.stats, aside)
                self.trials.revert(context)  # a plan measured before the recalibration keeps its key
                self._warn(f"recalibration on {gap.source} ({gap.kind}) undone: {r.undone_words()}")
                return plan0, rec0
        aside = None  # kept: the old simulations go before the new diagnosis simulates every option again
        if not self.existing:  # plan 0's own calibration record; an existing checkpoint keeps its provenance
            plan0 = dataclasses.replace(plan0, calibration=dict(plan0.calibration,
                                                                domains=list(self.data.calibration_domains)))
        self.diagnosis = self._diagnose(plan0, rec, options, journal="diagnosis_full_recalibrated.json",
                                        earlier=self._same_weights(plan0))
        r.domains_after_ppl = self.diagnosis.domains
        return plan0, rec

    def _recalibrate_judged_by_the_search(self, plan0: Plan, rec0: TrialRecord, options, gap) -> Tuple[Plan, TrialRecord]:
        """Budget mode's judge of a domain gap's recalibration: the plans the budget search measures first
        (``BudgetSearch.opening``), with the diagnosis and calibration before, then with the new data and a
        new diagnosis; kept when the best of them within the budget measures lower. Plan 0's widths are not
        what a budget plan is made of: from W3g64 RTN at 3.92 bits the demo kept HumanEval by them (GPTQ at
        plan 0's widths 0.873 -> 0.791) and shipped 0.300 where the old calibration's search shipped 0.271.
        The undone calibration's diagnosis is kept in diagnosis_full_recalibrated.json (its plots in
        plots_recalibrated when plan 0 changed with the data); the search reuses the kept side's trials."""
        before, check = list(self.data.calibration_domains), "recalibration check: the budget search's first plans"
        old = (self.stats, self.data.samples, self.data.calibration_domains, self.diagnosis)
        befores = self._budget_search(plan0, options, rec0).opening(f"{check}, calibrated on {before}")
        log.info("domain gap (%s): recalibrating on %s too", gap.domain, gap.source)
        self.stats = self._recalibrate(gap.source)
        # the old simulations go (not kept aside: beside the new diagnosis's they doubled the demo's peak
        # memory, 20 GB); if undone, a trial re-simulates the few options its plan picks
        self.bank.use_stats(self.stats)
        action = f"recalibrate: data.domains {before} + {gap.source}"
        self.report.recalibration = r = Recalibration(gap.finding, before, list(self.data.calibration_domains),
                                                      self.diagnosis.domains)
        context = self.trials.vary("calibration: " + ", ".join(self.data.calibration_domains))
        earlier = self._same_weights(plan0)  # plan 0 unchanged: only its options are diagnosed again
        rec = rec0 if earlier is not None else self.trials(plan0.with_changes({}, note=action), action=action,
                                                           drivers={gap.kind: 1})
        new0 = plan0 if self.existing else dataclasses.replace(
            plan0, calibration=dict(plan0.calibration, domains=list(self.data.calibration_domains)))
        self.diagnosis = self._diagnose(new0, rec, options, journal="diagnosis_full_recalibrated.json",
                                        plots="plots_recalibrated", publish=False, earlier=earlier)
        afters = self._budget_search(new0, options, rec).opening(f"{check}, calibrated on {list(self.data.calibration_domains)}")
        r.kld_before, r.kld_after = _best_within(befores, self.cfg.plan.budget.avg_bits), \
            _best_within(afters, self.cfg.plan.budget.avg_bits)
        r.probe = "the budget search's first plans"
        if Recalibration.pays(r.kld_before, r.kld_after):
            r.domains_after_ppl = self._publish(self.diagnosis).domains
            return new0, rec
        r.kept = False
        self.stats, self.data.samples, self.data.calibration_domains, self.diagnosis = old
        self.bank.use_stats(self.stats)
        self.trials.revert(context)  # the plans measured before the recalibration keep their keys
        self._warn(f"recalibration on {gap.source} ({gap.kind}) undone: {r.undone_words()}")
        return plan0, rec0

    def _same_weights(self, plan0: Plan) -> Optional[Diagnosis]:
        """After a recalibration: the diagnosis before it when plan 0's weights did not change with the
        data (no module in a rounding that reads it), so the new one measures only the options."""
        return None if plan0.reads_calibration() else self.diagnosis

    def _measure_probes(self, probes: List[Plan], names: List[str], kind: str) -> List[TrialRecord]:
        """One trial per probe of a recalibration check, with the calibration data it is measured on."""
        domains = list(self.data.calibration_domains)
        return [self.trials(p, action=f"recalibration check: {n}, calibrated on {domains}", drivers={kind: 1})
                for p, n in zip(probes, names)]

    def _calibrated_probes(self, plan0: Plan) -> List[Plan]:
        """The plans a recalibration is judged by: plan 0 when its algorithm learns from the calibration
        data, else plan 0's widths in each calibrated algorithm of loop.algorithms (none: not judged)."""
        if plan0.reads_calibration():
            return [plan0]
        out = []
        for alg in dict.fromkeys(str(a) for a in self.cfg.loop.algorithms if algorithms.get(str(a)).calibrated):
            changes = {n: Precision(p.bits, p.group_size, p.symmetric, alg) for n, p in plan0.modules.items()
                       if not p.is_float and p.alg.family == algorithms.get(alg).family}
            if changes:
                out.append(plan0.with_changes(changes, note=f"plan 0's widths in {alg}"))
        return out

    def _sequential(self, result: search.SearchResult) -> search.SearchResult:
        """loop.sequential_gptq (with loop.tune=none): a measured plan's GPTQ
        modules rounded again layer by layer on the plan's own quantized inputs (sequential.py),
        measured as one more trial. Budget mode: the chosen plan, replaced where this measures a lower
        KLD. Threshold mode: the largest failing plan below the passing one, which then ships if it
        passes (a smaller plan); with no passing plan, the last one."""
        from quantfix import sequential

        cfg, budget = self.cfg.loop, self.cfg.plan.budget.avg_bits
        if not cfg.sequential_gptq or cfg.tune != "none" or self.gguf:
            return result
        if budget is not None:
            src = result.chosen
        else:
            src = result.below if result.best is not None else result.last
        seq_plan = sequential.sequential_plan(src.plan) if src is not None else None
        if seq_plan is None or seq_plan == src.plan:
            return result
        self.trials.grant(1)
        with self.timer("sequential gptq"):
            out = self.rt.batched(lambda bs: sequential.requantize(self.bank, src.plan, self.data.samples, bs))
        self.bank.use_tuned(seq_plan, {n: w for n, (w, _, _) in out.items()}, {n: (s, z) for n, (_, s, z) in out.items()})
        action = f"sequential GPTQ of trial {src.id}"
        rec = self.trials(seq_plan, src.plan, fresh=True, action=action, tuned_from=src.id, drivers={"sequential": 1})
        before = result.chosen.metrics.kld_mean
        better = rec.metrics.kld_mean < before if budget is not None else not rec.failed
        log.info("sequential GPTQ of trial %s: KLD %.5f -> %.5f (%s)", src.id, src.metrics.kld_mean, rec.metrics.kld_mean,
                 "kept" if better else "not kept")
        if better:
            result.reason += f"; {action}: KLD {src.metrics.kld_mean:.5f} -> {rec.metrics.kld_mean:.5f}"
            result.best, result.last = (None if rec.failed else rec), rec
        return result

    def _tune(self, result: search.SearchResult) -> search.SearchResult:
        """loop.tune=autoround, the search's last step: AutoRound tunes the rounding and scales of a
        measured plan (its widths kept) and the result is measured as one more trial. Threshold
        mode: first the largest failing plan below the passing one (tuning may make the smaller plan
        pass), then the passing plan itself; with no passing plan, the last one. A tuned plan
        replaces its source when it passes. Budget mode: the ``loop.tune_candidates`` measured plans
        within the budget with the lowest KLD, each tuned; the lowest KLD measured, tuned or not,
        ships."""
        from quantfix import tune

        cfg, budget = self.cfg.loop, self.cfg.plan.budget.avg_bits
        if cfg.tune == "none":
            return result
        if budget is not None:
            sources = self._budget_tune_sources(result.chosen, budget, cfg.tune_candidates)
            self.trials.grant(len(sources) - 1)  # the search kept one trial for the tuning
        elif result.best is not None:
            sources = [r for r in (result.below, result.best) if r is not None]
        else:
            sources = [result.last]
        settings = tune.TuneSettings(cfg.tune_iters, cfg.tune_batch_size, self.cfg.data.seed, compile=cfg.tune_compile,
                                     alg_ext=cfg.tune_alg_ext)
        best, best_weights = result.chosen, None
        for src in sources:
            tuned_plan = tune.tuned_plan(src.plan)
            if tuned_plan == src.plan:
                continue
            self.bank.restore()
            with self.timer("autoround tuning"):
                tuned = tune.tune(self.rt.model, self.rt.tokenizer, src.plan, self.data.samples, self.sim_dtype, settings)
            weights = ({n: w for n, (w, _, _) in tuned.items()}, {n: (sc, z) for n, (_, sc, z) in tuned.items()})
            self.bank.use_tuned(tuned_plan, *weights)
            action = (f"AutoRound tuning ({cfg.tune_iters} iterations per block{tune.extension_words(src.plan, settings)}) "
                      f"of trial {src.id}")
            rec = self.trials(tuned_plan, src.plan, fresh=True, action=action, tuned_from=src.id, drivers={"tune": 1})
            src_kld, kld = src.metrics.kld_mean, rec.metrics.kld_mean
            if budget is not None:
                better = kld < best.metrics.kld_mean
            else:
                better = not rec.failed and (src is not result.best or kld < src_kld)
            log.info("AutoRound tuning of trial %s: KLD %.5f -> %.5f (%s)", src.id, src_kld, kld,
                     "kept" if better else "not kept")
            if not better:
                continue
            result.reason += f"; {action}: KLD {src_kld:.5f} -> {kld:.5f}"
            if budget is None:
                result.best = result.last = rec
                return result
            best, best_weights = rec, (tuned_plan, weights)
            result.best, result.last = (None if rec.failed else rec), rec
        if best_weights is not None and best is not self.trials.last:
            # a later tuning shares (module, precision) keys in the bank: serve the kept one's weights again
            self.bank.use_tuned(best_weights[0], *best_weights[1])
        return result

    def _budget_tune_sources(self, chosen: TrialRecord, budget: float, k: int) -> List[TrialRecord]:
        """The search's chosen plan and, up to ``k`` in all, the next measured plans within the budget
        by KLD (untuned ones only; one per plan)."""
        pool = [r for r in self.trials.records if r.avg_bits <= budget + 1e-6 and r.tuned_from is None
                and math.isfinite(r.metrics.kld_mean)]
        seen, out = set(), []
        for r in [chosen] + sorted(pool, key=lambda r: r.metrics.kld_mean):
            key = plan_key(r.plan)
            if key not in seen and len(out) < k:
                seen.add(key)
                out.append(r)
        return out

    def _ship(self, result: search.SearchResult) -> None:
        """Save the chosen plan, export it with the real engine, reload and verify it; the verdict."""
        cfg, chosen = self.cfg, result.chosen
        plan = chosen.plan
        plan.save(self.out_dir / "plan.yaml")
        self.report.pareto = {"measured": [[t.avg_bits, t.metrics.kld_mean, t.metrics.ppl] for t in self.trials.records]}
        if result.frontier:
            self.report.pareto["predicted"] = [[round(b, 4), round(k, 6)] for b, k in result.frontier]
        like = self._measure_like(plan, chosen.metrics)
        static = self.bank.export_tensors(plan) if cfg.export.enabled else {}  # what the trials measured, to ship
        self.bank.restore()
        self.bank.release()  # the float copies and kept simulations: the export and the reload need the memory
        self.bank = None
        self.report.final = Outcome(plan.summary_str(), round(plan.avg_bits, 4), plan.size_bytes, result.best is not None,
                                    result.reason, len(self.trials.records), chosen_trial=chosen.id)
        self.report.final.domains, self.report.final.generations = like.get("domains") or {}, like.get("generations") or []
        self.report.changes = explain.changes(self.trials.records[0].plan, plan,
                                              self.diagnosis.findings if self.diagnosis is not None else [])
        if cfg.export.enabled:
            self.report.final.verification = self._export_and_verify(plan, chosen, static)
        if self.existing is not None:
            path = self.existing.write_overrides(plan, self.out_dir, cfg.model.name_or_path)
            self.report.final.llama_quantize_overrides = str(path) if path else None
        self._verdict()

    def _measure_like(self, plan: Plan, metrics) -> dict:
        """The shipped plan (its trial's weights: what the checkpoint holds; ``metrics``: that trial's on
        the eval windows) measured as the diagnosis measured plan 0: per-domain perplexity and KLD, probe
        generations. Done on the live model, before the export: a reloaded compressed checkpoint
        generates tokens far slower."""
        if self.diagnosis is None or not self.diagnosis.sides:
            return {}
        self.bank.apply(plan, progress=False)
        with self.timer("shipped plan: domains and probes"):
            return measure_like(self.diagnosis, self.rt.model, self.rt.tokenizer, self.rt.batch_size,
                                evals=(self.base, metrics))

    def _export_and_verify(self, plan: Plan, trial: TrialRecord, static) -> verify.Verification:
        cfg = self.cfg
        if self.gguf:
            return self._export_gguf(plan, trial)
        existing = self.out_dir / "checkpoint"
        if cfg.loop.resume and exp.same_checkpoint(existing, plan, self.fingerprint):
            ckpt = existing  # exported before the interruption: verify it again
        else:
            spec = exp.ExportSpec(plan, self.resolved.path, cfg.quant, self.sim_dtype, static, self.data.samples,
                                  self.fingerprint, cfg.model.trust_remote_code)
            with self.timer("export"):
                ckpt, warnings = exp.export(self.rt.model, self.rt.tokenizer, spec, self.out_dir)
            for w in warnings:
                self.report.warnings.append(w)
        if static:
            static.clear()  # the exported weights (kept simulations: up to the model's size) are written
        self.rt.model = None  # free the working model before loading the checkpoint: never two models on the device
        weights.free_memory(self.device)
        if not cfg.export.verify:
            return verify.Verification(str(ckpt), exp.dir_size(ckpt))
        with self.timer("verify (reload + evaluate)"):
            v, warnings = verify.verify(ckpt, self._reload_spec(), self._measure_checkpoint, trial, cfg.thresholds,
                                        self.base)
        for w in warnings:
            self._warn(w)
        return v

    def _export_gguf(self, plan: Plan, trial: TrialRecord) -> verify.Verification:
        """llama-quantize writes the plan's types from the F16 parent with quantfix's imatrix
        (``gguf/model.gguf``); llama-perplexity measures it against the F16 on the eval windows."""
        self.llama.names = gguf_export.module_names(self.llama.f16, plan.modules)
        with self.timer("export"):
            path, written = gguf_export.export(self.llama, plan, self.stats, self.out_dir / "gguf", self.cfg.data.seq_len)
        log.info("GGUF: %s (%s)", path, ", ".join(gguf_plan.summary({n: t for n, t in written.items()
                                                                     if n in self.llama.names.values()})))
        if not self.cfg.export.verify:
            return verify.Verification(str(path), path.stat().st_size, format="gguf")
        with self.timer("verify (llama-perplexity)"):
            v, warnings = verify.verify_gguf(path, lambda: gguf_export.measure(path, self.llama), trial,
                                             self.cfg.thresholds)
        for w in warnings:
            self._warn(w)
        return v

    def _eval_windows(self, tokenizer, data_dir: str) -> torch.Tensor:
        """The eval windows: the first n_windows x seq_len tokens of eval.source; in GGUF mode those
        llama-perplexity scores (its chunks of the same text, read back from its saved float
        log-probabilities), so that quantfix and llama.cpp measure the same tokens."""
        cfg, m = self.cfg, self.cfg.model
        if not self.gguf:
            return data_mod.eval_windows(cfg.eval.source, data_dir, tokenizer, cfg.eval.n_windows, cfg.eval.seq_len,
                                         offline=self.offline)
        key = cache_mod.model_fingerprint(self.resolved.path, m.revision)[:20]
        with self.timer("llama.cpp: F16 parent and its log-probabilities"):
            self.llama = gguf_export.prepare(m.name_or_path, self.resolved.path, (cfg.eval.source, data_dir, self.offline),
                                             (cfg.eval.n_windows, cfg.eval.seq_len), self.cache, key)
        return gguf_export.windows(self.llama.base, self.llama.f16, cfg.eval.n_windows)

    def _skip(self) -> int:
        """Positions of each eval window left unscored: the first half where llama-perplexity's
        scoring is followed (eval.scored: second_half, or auto in GGUF mode)."""
        e = self.cfg.eval
        half = str(e.scored) == "second_half" or (str(e.scored) == "auto" and self.gguf)
        return e.seq_len // 2 if half else 0

    def _reload_spec(self) -> verify.ReloadSpec:
        return verify.ReloadSpec(self.dtype, self.device, self.cfg.model)

    def _measure_checkpoint(self, model) -> verify.Measured:
        """A reloaded checkpoint measured as the trials were (and the tasks)."""
        m = self._evaluate(model, desc="verify checkpoint")
        rows, fails = {}, []
        if self.task_base:
            rows, fails = verdict.task_checks(self.task_base, self._task_results(model), self.cfg.thresholds)
        where = ev.locate_nonfinite(model, self.data.windows[:1]) if verdict.nonfinite(m) else None
        return verify.Measured(m, rows, fails, where)

    def _verdict(self) -> None:
        """The one place a run's verdict is decided: the search passed and, when the checkpoint was
        verified, the reloaded checkpoint passes too."""
        fin = self.report.final
        v = fin.verification
        fails = v.failed if v is not None and v.metrics is not None else []
        fin.passed = fin.search_passed and not fails
        if fin.search_passed and fails:
            fin.stop_reason += "; but the reloaded checkpoint fails: " + "; ".join(fails)

    # ---- measurements and caches -------------------------------------------------------------
    def _evaluate(self, model=None, desc: str = "evaluate"):
        """The metrics of ``model`` (default: the live one) against the float reference."""
        model = self.rt.model if model is None else model
        return self.rt.batched(lambda bs: self.evaluator(model, self.data.windows, bs, True, desc))

    def _task_results(self, model=None):
        """Task metrics of ``model`` (default: the live one) on eval.tasks."""
        from quantfix import tasks

        with self.timer("tasks"):
            return tasks.score_tasks(self.rt.model if model is None else model, self.rt.tokenizer,
                                     list(self.cfg.eval.tasks), self.data.data_dir, self.cfg.eval)

    def _task_baseline(self):
        """Float task metrics, cached on disk per (model, tasks, subset)."""
        from quantfix import tasks

        with self.timer("tasks"):
            return tasks.cached_baseline(self.rt.model, self.rt.tokenizer, self.cfg.eval, self.data.data_dir,
                                         self.cache / "tasks", [self.model_fp, str(self.dtype)])

    def _emulate_export_dtype(self, dtype: torch.dtype) -> None:
        """Round the live model's weights to ``dtype`` (kept in the compute dtype: float16 values in
        float32 on the CPU), so that every trial computes with the weights the checkpoint will hold;
        simulations then round in ``dtype`` too. The float reference stays the unrounded model: the
        rounding is part of the measured error."""
        self.sim_dtype = dtype
        if dtype == self.dtype or torch.finfo(dtype).bits >= torch.finfo(self.dtype).bits:
            return
        weights.round_params(self.rt.model, dtype)

    def needs_full_hessian(self) -> bool:
        """Whether an algorithm the run can simulate (plan 0's, loop.algorithms) or the greedy
        policy (its output errors) needs the full calibration Hessian; else its diagonal suffices."""
        c = self.cfg
        return c.loop.policy == "greedy" or any(algorithms.get(a).needs_hessian
                                                for a in [c.quant.algorithm, *c.loop.algorithms])

    def _calib_stats(self, names: List[str]) -> CalibStats:
        self._calib_names = list(names)
        full = self.needs_full_hessian()
        head = self.cfg.diagnose.absmax_samples  # the diagnosis's float-side absmax, read from this pass
        dtype = pass_dtype(self.cfg.data.dtype, self.rt.model)
        key = calib.cache_key(self.model_fp + str(self.dtype) + str(self.sim_dtype), self.data.samples, names, full,
                              head, dtype)
        with self.timer("calibration stats"), weights.autocast(self.rt.model, dtype):  # statistics in float32
            return self.rt.batched(lambda bs: calib.collect(self.rt.model, self.data.samples, names, bs,
                                                            cache_path=self.cache / "calib" / f"{key}.pt",
                                                            full_hessian=full, head_samples=head))

    def _recalibrate(self, add_domain: str) -> CalibStats:
        """A repair action: add ``add_domain`` to the calibration domains (same number of samples,
        drawn round-robin), then recompute the calibration statistics for the same modules."""
        d = self.cfg.data
        domains = list(self.data.calibration_domains) + [add_domain]
        with self.timer("data"):
            self.data.samples = data_mod.calibration_samples(domains, self.data.data_dir, self.rt.tokenizer, d.n_samples,
                                                             d.seq_len, d.seed, offline=self.offline,
                                                             holdout=self._holdout())
        self.data.calibration_domains = tuple(domains)
        # the float model's statistics, as at set-up (and as their cache key says): the pass ran on whatever
        # plan was applied last (the diagnosis's plan 0, a check's plan), its Hessians of quantized inputs
        self.bank.restore()
        return self._calib_stats(self._calib_names)

    # ---- the end -----------------------------------------------------------------------------
    def _collect(self) -> None:
        """What the trials said into the report, with the timings and memory."""
        if self.trials is not None:
            self.report.trials = list(self.trials.records)
            self.report.warnings += [w for w in self.trials.warnings if w not in self.report.warnings]
        self.report.timings_s = dict(self.timer.stages, total=round(time.perf_counter() - self.t_start, 2))

    def fail(self, e: BaseException) -> None:
        """report.json of a run that stopped under way: the stop reason (the error's line,
        "interrupted", or the internal error's type) and whatever was measured until then; never
        masks the exception. Input refused while setting up writes none."""
        if not self.set_up and isinstance(e, QuantfixError):
            return
        if isinstance(e, QuantfixError):
            reason = str(e)
        elif isinstance(e, KeyboardInterrupt):
            reason = "interrupted"
        else:
            reason = f"internal error: {type(e).__name__}"
        self._collect()
        self.report.status = "stopped"
        fin = self.report.final or Outcome("", 0.0, 0, False, reason, 0)
        fin.passed, fin.stop_reason, fin.trials = False, reason, len(self.report.trials)
        self.report.final = fin
        try:
            self.report.save(self.out_dir)
        except Exception as err:  # noqa: BLE001 - the original error is what the user needs to see
            log.warning("could not write report.json after the failure: %s", err)

    def finish(self) -> RunReport:
        """report.json, the plots, report.md/html and the console summary."""
        r = self.report
        self._collect()
        r.status = "finished"
        r.memory = dict(peak_memory_mb(self.device), stages=self.timer.memory)
        r.eval_batch_size = self.rt.batch_size
        r.save(self.out_dir)
        if r.trials:
            rep.plot_iterations(r, self.out_dir)
        rep.write_human(r, self.out_dir, self.diagnosis)
        print("\n" + rep.table(r) if r.trials else f"\nfloat baseline PPL {r.baseline.ppl:.3f}")
        fin = r.final
        if fin:
            print(f"\nresult: {'PASSED' if fin.passed else 'FAILED'} ({fin.stop_reason}); "
                  f"{fin.trials} trials; plan {fin.plan_summary}")
            if fin.verification is not None:
                print(f"checkpoint: {fin.verification.checkpoint} ({fin.verification.checkpoint_bytes / 1e6:.1f} MB)")
        print(f"run dir: {self.out_dir}")
        return r


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-test").touch()
        (out_dir / ".write-test").unlink()
    except OSError as e:
        raise QuantfixError(f"cannot write the output directory {out_dir} ({e.strerror}): "
                            "pick a writable hydra.run.dir or output_dir") from e


def prior_run(out_dir: Path):
    """(fingerprint, finished) of the run a run dir already holds, or None: finished when its
    report.json says so (or, from before that was recorded, when it holds a checkpoint)."""
    report, ckpt = out_dir / "report.json", out_dir / "checkpoint"
    try:
        d = json.loads(report.read_text()) if report.exists() else {}
    except (OSError, ValueError):
        d = {}
    fp = d.get("fingerprint") or ""
    if not fp and (ckpt / exp.FINGERPRINT_FILE).exists():
        fp = (ckpt / exp.FINGERPRINT_FILE).read_text().strip()
    if not d and not ckpt.exists():
        return None
    return fp, d.get("status") == "finished" or (not d.get("status") and ckpt.exists())


def _best_within(recs: List[TrialRecord], budget: float) -> float:
    """The lowest finite KLD among ``recs`` within ``budget`` bits (all of them when none is)."""
    finite = [r for r in recs if math.isfinite(r.metrics.kld_mean)]
    pool = [r for r in finite if r.avg_bits <= budget + 1e-6] or finite
    return min((r.metrics.kld_mean for r in pool), default=math.inf)
