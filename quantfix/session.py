"""The run's shared resources, built once by the loop: config, output dir, timers, the loaded model
(``Runtime``), the token windows (``RunData``), the cache, and the cached float reference, task
baseline and calibration statistics. Only the loop holds a Session; stages get its parts."""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import OmegaConf

from quantfix import data as data_mod
from quantfix import evaluate as ev
from quantfix import loading, source, weights
from quantfix import cache as cache_mod
from quantfix.config import validate
from quantfix import calib as calib_mod
from quantfix.runtime import RunData, Runtime

log = logging.getLogger(__name__)


class Timer:
    """Wall time per stage (summed over repeated entries) and the memory snapshot at each stage's
    end (host RSS peak so far and now, device peak so far) with how much the stage raised each
    peak (``*_rise``, summed over its entries): the stage with the rise made the peak."""

    def __init__(self):
        self.stages: Dict[str, float] = {}
        self.memory: Dict[str, Dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        before = ev.memory_now_gb()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - t, 2)
            self.memory[name] = ev.memory_rise(before, ev.memory_now_gb(), self.memory.get(name))


class Session:
    """Everything the stages share for one run: model, data, caches, timers."""

    def __init__(self, cfg, out_dir: Path):
        validate(cfg)
        self.cfg, self.out_dir, self.timer = cfg, out_dir, Timer()
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
        self.dtype = loading.resolve_dtype(cfg.model.dtype, self.device)
        self.cache = cache_mod.cache_dir(cfg.cache_dir)
        data_dir = str(data_mod.default_data_dir(cfg.data_dir))
        self.offline = source.is_offline(cfg.offline)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        m = cfg.model
        with self.timer("load model"):
            self.resolved = source.resolve(m.name_or_path, self.cache, offline=self.offline, revision=m.revision)
            model, tokenizer = loading.load(self.resolved, self.dtype, self.device, m.revision, m.trust_remote_code,
                                              m.device_map, dict(m.max_memory) if m.max_memory else None,
                                              m.offload_folder, allow_pickle=m.allow_pickle, offline=self.offline)
        loading.check_positions(model.config, {  # the diagnosis (not in mode=baseline) has its own length
            "eval.seq_len": cfg.eval.seq_len, "data.seq_len": cfg.data.seq_len,
            **({} if cfg.mode == "baseline" else {"diagnose.domain_seq_len": cfg.diagnose.domain_seq_len})})
        with self.timer("data"):
            windows = data_mod.eval_windows(cfg.eval.source, data_dir, tokenizer, cfg.eval.n_windows, cfg.eval.seq_len,
                                            offline=self.offline)
            samples = data_mod.calibration_samples(list(cfg.data.domains), data_dir, tokenizer, cfg.data.n_samples,
                                                   cfg.data.seq_len, cfg.data.seed, offline=self.offline,
                                                   holdout=self._holdout())
        with self.timer("fingerprint"):  # content keys of every cache entry and of the resume journal
            self.model_fp = cache_mod.model_fingerprint(self.resolved.path, m.revision)
            q = cfg.quantized.name_or_path
            self.quantized_fp = (cache_mod.model_fingerprint(q) if Path(q).is_dir() else
                                 cache_mod.file_digest(Path(q)) if Path(q).is_file() else None) if q else None
            self.fingerprint = self._run_fingerprint(windows, samples)
        # eval.batch_size=0 (auto): 4 on the CPU; on CUDA as many windows as fit, up to 32
        bs = cfg.eval.batch_size or (min(cfg.eval.n_windows, 32) if self.device.type == "cuda" else 4)
        self.rt = Runtime(model, tokenizer, self.device, bs, cfg.seed)
        self.data = RunData(windows, samples, data_dir, tuple(cfg.data.domains), self.offline, cfg.eval.source)
        self.evaluator: ev.Evaluator = None  # set by reference()
        self.external = None  # formats.External of quantized.name_or_path, once read (loop._load_external)
        self.sim_dtype = self.dtype  # the dtype the trials round weights in (emulate_export_dtype)

    def _run_fingerprint(self, windows: torch.Tensor, samples: torch.Tensor) -> str:
        """What a journaled trial or diagnosis depends on: model and checkpoint content, eval windows,
        calibration samples, dtype and device, thresholds, loop / quant / eval / diagnose settings
        and the code. ``loop.resume`` and ``loop.max_iters`` are left out: a resumed run may go on
        for more iterations."""
        c = OmegaConf.to_container(self.cfg, resolve=True)
        loop = {k: v for k, v in c["loop"].items() if k not in ("resume", "max_iters")}
        return cache_mod.digest({
            "model": self.model_fp, "quantized": self.quantized_fp, "windows": cache_mod.tensor_digest(windows),
            "samples": cache_mod.tensor_digest(samples), "dtype": str(self.dtype), "device": self.device.type,
            "thresholds": c["thresholds"], "loop": loop, "quant": c["quant"], "eval": c["eval"], "data": c["data"],
            "diagnose": c["diagnose"], "probes": c["probes"], "plan": c["plan"], "seed": c["seed"],
            "code": cache_mod.code_version()})[:20]

    def weights_key(self) -> str:
        """What decides the quantized weights besides the float model and the plan: the calibration
        samples in use (they change on recalibration), the algorithm settings, and the content of an
        existing checkpoint whose weights are diagnosed (``quantized.name_or_path``)."""
        q = self.cfg.quant
        return cache_mod.digest({
            "samples": cache_mod.tensor_digest(self.data.samples), "quantized": self.quantized_fp,
            "knobs": [q.gptq_dampening, q.gptq_block_size, q.awq_grid, q.llm_int8_threshold],
            "dtype": str(self.dtype), "sim_dtype": str(self.sim_dtype), "device": self.device.type})[:20]

    def export_dtype(self):
        """(dtype the checkpoint's float parts are written in, warning or None), decided before any
        trial so that the trials measure it. ``export.dtype=auto``: the model's dtype when it is
        16-bit, float16 when it is float32. A 16-bit model exports in its own dtype (another 16-bit
        dtype would round the weights the trials measured differently: said in the warning);
        float16 that would overflow becomes bfloat16 (``export.safe_export_dtype``)."""
        from quantfix import export as exp

        want, warning = self.cfg.export.dtype, None
        half = self.dtype if self.dtype != torch.float32 else torch.float16
        target = half if want == "auto" else getattr(torch, want)
        if self.dtype != torch.float32 and target not in (self.dtype, torch.float32):
            warning = (f"export.dtype={want} ignored: the model computes in {str(self.dtype).replace('torch.', '')}, "
                       f"which the checkpoint keeps so that it is what the trials measured; for a {want} checkpoint "
                       f"set model.dtype={want}")
            target = self.dtype
        target, overflow = exp.safe_export_dtype(self.rt.model, target)
        return target, warning or overflow

    def emulate_export_dtype(self, dtype: torch.dtype) -> None:
        """Round the live model's weights to ``dtype`` (kept in the compute dtype: float16 values in
        float32 on the CPU), so that every trial computes with the weights the checkpoint will hold;
        simulations then round in ``dtype`` too (``WeightBank(sim_dtype=...)``). The float reference
        stays the unrounded model: the rounding is part of the measured error."""
        self.sim_dtype = dtype
        if dtype == self.dtype or torch.finfo(dtype).bits >= torch.finfo(self.dtype).bits:
            return
        weights.round_params(self.rt.model, dtype)

    def reference(self) -> ev.Reference:
        """The float model's log-probs on the eval windows (cached on disk); sets ``evaluator``."""
        e = self.cfg.eval
        key = ev.cache_key(self.model_fp, self.data.windows, e.topk, e.full_max_mb, self.dtype)
        with self.timer("float reference"):
            ref = self.rt.batched(lambda bs: ev.reference(self.rt.model, self.data.windows, bs, e.topk, e.full_max_mb,
                                                          cache_path=self.cache / "reference" / f"{key}.pt"))
        self.evaluator = ev.Evaluator(ref, compile=e.compile)
        return ref

    def _holdout(self) -> Dict[str, int]:
        """Calibration never sees the eval windows (the first n_windows x seq_len tokens of eval.source)."""
        return {self.cfg.eval.source: self.cfg.eval.n_windows * self.cfg.eval.seq_len}

    def evaluate(self, model=None, desc: str = "evaluate", progress: bool = True) -> ev.Metrics:
        """The metrics of ``model`` (default: the live one) against the float reference."""
        model = self.rt.model if model is None else model
        return self.rt.batched(lambda bs: self.evaluator(model, self.data.windows, bs, progress, desc))

    def task_results(self, model=None) -> Dict[str, Any]:
        """Task metrics of ``model`` (default: the live one) on eval.tasks, a progress bar per task."""
        from quantfix import tasks as tasks_mod

        e = self.cfg.eval
        with self.timer("tasks"):
            return tasks_mod.score_tasks(self.rt.model if model is None else model, self.rt.tokenizer, list(e.tasks),
                                         self.data.data_dir, e.task_limit, e.task_seed, e.task_batch_size,
                                         dict(e.task_paths))

    def task_baseline(self) -> Dict[str, Any]:
        """Float task metrics, cached on disk per (model, tasks, subset)."""
        from quantfix import tasks as tasks_mod

        e = self.cfg.eval
        out, todo = {}, []
        for t in e.tasks:
            path = self.cache / "tasks" / f"{self._task_key(t)}.json"
            cached = cache_mod.load_entry(path, lambda b: tasks_mod.TaskResult.from_dict(json.loads(b)))
            if cached is not None:
                out[t] = cached
            else:
                todo.append((t, path))
        if todo:
            with self.timer("tasks"):
                fresh = tasks_mod.score_tasks(self.rt.model, self.rt.tokenizer, [t for t, _ in todo],
                                              self.data.data_dir, e.task_limit, e.task_seed, e.task_batch_size,
                                              dict(e.task_paths))
            for t, path in todo:
                cache_mod.atomic_write(path, lambda tmp, r=fresh[t]: tmp.write_text(json.dumps(r.to_dict(per_doc=True))))
                out[t] = fresh[t]
        return out

    def _task_key(self, task: str) -> str:
        """A float task result's key: model content, dtype, the task's subset and its data file's content."""
        from quantfix import tasks as tasks_mod

        e = self.cfg.eval
        f = tasks_mod.task_path(task, self.data.data_dir, dict(e.task_paths)) if task in tasks_mod.LOCAL_TASKS else None
        data = cache_mod.file_digest(f) if f is not None and f.is_file() else str(dict(e.task_paths).get(task))
        return cache_mod.digest([f"tasks-v{cache_mod.CACHE_VERSION}", self.model_fp, str(self.dtype), task,
                                 e.task_limit, e.task_seed, data])[:16]

    def recalibrate(self, add_domain: str) -> calib_mod.CalibStats:
        """A repair action: add ``add_domain`` to the calibration domains (same number of samples,
        drawn round-robin), then recompute the calibration statistics for the same modules."""
        cfg = self.cfg.data
        domains = list(self.data.calibration_domains) + [add_domain]
        with self.timer("data"):
            self.data.samples = data_mod.calibration_samples(domains, self.data.data_dir, self.rt.tokenizer,
                                                             cfg.n_samples, cfg.seq_len, cfg.seed, offline=self.offline,
                                                             holdout=self._holdout())
        self.data.calibration_domains = tuple(domains)
        return self.calib_stats(self._calib_names)

    def needs_full_hessian(self) -> bool:
        """Whether an algorithm the run can simulate (plan 0's, loop.algorithms) or the greedy
        policy (its output errors) needs the full calibration Hessian; else its diagonal suffices."""
        from quantfix.quantize import algorithms

        c = self.cfg
        algs = [c.quant.algorithm, *c.loop.algorithms]
        return c.loop.policy == "greedy" or any(algorithms.get(a).needs_hessian for a in algs)

    def calib_stats(self, names: List[str]) -> calib_mod.CalibStats:
        self._calib_names = list(names)
        full = self.needs_full_hessian()
        key = calib_mod.cache_key(self.model_fp + str(self.dtype) + str(self.sim_dtype), self.data.samples, names, full)
        with self.timer("calibration stats"):
            return self.rt.batched(lambda bs: calib_mod.collect(self.rt.model, self.data.samples, names, bs,
                                                                cache_path=self.cache / "calib" / f"{key}.pt",
                                                                full_hessian=full))

    def sensitivity_cache(self, key: str) -> Path:
        return self.cache / "sensitivity" / f"{key}.json"
