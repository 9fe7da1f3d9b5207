"""WeightBank: apply a Plan to the model in place (simulated), and restore the float weights.

Trial weights replace the originals in the live model; the float originals of the planned
modules are kept on the CPU, so the accelerator never holds two copies of the model. Applying
a new plan rewrites only the modules whose precision changed. How each module's weight is
simulated comes from its algorithm's entry in ``algorithms.REGISTRY``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from quantfix.weights import device_room, set_weight, weight_device, weight_of
from quantfix.plan import Plan, Precision
from quantfix.quantize import algorithms, fake, scales
from quantfix.calib import CalibStats
from quantfix.quantize.stats import InputStats

log = logging.getLogger(__name__)


class LazyWeights(Mapping):
    """module -> a plan's simulated weight, computed by the bank when asked (kept simulations are
    served from where they are kept)."""

    def __init__(self, bank: "WeightBank", precisions: Dict[str, Precision]):
        self._bank, self._p = bank, precisions

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._bank.simulate(name, self._p[name]).to(dtype=self._bank.originals[name].dtype)

    def __iter__(self):
        return iter(self._p)

    def __len__(self):
        return len(self._p)


def _host_copy(w: torch.Tensor) -> torch.Tensor:
    """The float original's host copy: page-locked when the weight lives on an accelerator, so the
    many copies back (every simulation starts from the original) run at full bus speed (at 8B a
    pageable 14 GB sweep took seconds, and a Fisher pass made several)."""
    if w.device.type != "cuda":
        return w.to("cpu", copy=True)
    try:
        out = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
    except RuntimeError:  # no page-locked memory to be had: a plain copy works, slower
        return w.to("cpu", copy=True)
    out.copy_(w)
    return out


SIM_DEVICE_RESERVE = 0.25  # kept simulations live on the accelerator while this share of it stays free
SWEEP_TOGETHER_ON = ("cuda",)  # devices where GPTQ stacks of one shape are swept in one engine call
# ... stacks of at most this many weights (rows x columns): the demo's (at most 1.8M) took 5-7 ms a call on an
# H100, 30 of them batched 20-23 ms (`bench_option_sim.py --compare gptq --time-calls`). Larger stacks (not
# measured batched) stay one call each: a fixed batch would make a trial's one stack cost its whole shape's
SWEEP_TOGETHER_MAX = 2 ** 22


class WeightBank:
    """Float originals of the planned modules (on CPU) and the plan currently applied. Kept
    simulations (searched or calibrated weights, computed once) live on the module's accelerator
    while it has room, else on the host."""

    def __init__(self, model, names, stats: Optional[CalibStats] = None, gptq_damp: float = 0.01,
                 gptq_block: int = 128, awq_grid: int = 20, int8_threshold: float = 6.0,
                 sim_dtype: Optional[torch.dtype] = None):
        self.model = model
        mods = dict(model.named_modules())
        self.modules = {n: mods[n] for n in names}
        self.originals = {n: _host_copy(weight_of(m)) for n, m in self.modules.items()}
        self.stats = stats
        self.current: Dict[str, Precision] = {}
        self.gptq_damp, self.gptq_block, self.awq_grid, self.int8_threshold = gptq_damp, gptq_block, awq_grid, int8_threshold
        self._awq: Dict[Tuple[str, int, int, bool], torch.Tensor] = {}
        self._sim: Dict[Tuple[str, Precision], torch.Tensor] = {}
        self._qp: Dict[str, dict] = {}  # module -> searched scales (algorithms.SimInputs.qparams_cache)
        self._tuned_qp: Dict[Tuple[str, Precision], Tuple[torch.Tensor, torch.Tensor]] = {}  # tuned elsewhere
        self._stale: set = set()  # modules whose live weight is not what ``current`` says (apply_rtn)
        # the dtype simulations compute scales and round in: the checkpoint's (the engine quantizes
        # the model cast to it), when narrower than the live model's (float16 on a float32 CPU run)
        self.sim_dtype = sim_dtype
        # an existing checkpoint's modules (quantized.name_or_path): name -> (weight, scale, zero),
        # served for its ckpt precisions, kept across recalibrations (they never depend on our data)
        self.external: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._rerounded: set = set()  # external modules served as the export writes them (reround_external)
        self._act_hooks: Dict[str, object] = {}  # module -> forward pre-hook rounding its input (llama.cpp types)

    def original(self, name: str, device=None) -> torch.Tensor:
        w = self.originals[name]
        return w.to(device or weight_device(self.modules[name]), torch.float32)

    def _awq_scales(self, name: str, p: Precision) -> Optional[torch.Tensor]:
        if self.stats is None or name not in self.stats.module_input:
            return None
        key = self.stats.module_input[name]
        ck = (key, p.bits, p.group_size, p.symmetric)
        if ck not in self._awq:
            members = [m for m in self.stats.groups()[key] if m in self.modules]
            dev = weight_device(self.modules[name])
            st = self.stats.inputs[key]
            _, s = fake.awq_search([self.original(m, dev) for m in members], st.full().to(dev), st.absmean,
                                   p.bits, p.group_size, p.symmetric, self.awq_grid)
            self._awq[ck] = s
        return self._awq[ck]

    def _inputs(self, name: str, p: Precision) -> algorithms.SimInputs:
        has_stats = self.stats is not None and name in self.stats.module_input
        return self.inputs_with(name, p, self.stats.of(name) if has_stats else None)

    def inputs_with(self, name: str, p: Precision, stats: Optional[InputStats]) -> algorithms.SimInputs:
        """What a simulation of ``name`` at ``p`` reads, with ``stats`` as its calibration statistics
        (sequential GPTQ's, collected on a plan's quantized inputs) and the bank's searched scales."""
        return algorithms.SimInputs(stats=stats,
                                    awq_scales=lambda: self._awq_scales(name, p), gptq_damp=self.gptq_damp,
                                    gptq_block=self.gptq_block, int8_threshold=self.int8_threshold,
                                    dtype=self._dtype(name), qparams_cache=self._qp.setdefault(name, {}))

    def _dtype(self, name: str) -> torch.dtype:
        own = self.originals[name].dtype
        if self.sim_dtype is None or torch.finfo(self.sim_dtype).bits >= torch.finfo(own).bits:
            return own
        return self.sim_dtype

    def simulate(self, name: str, p: Precision) -> torch.Tensor:
        if not p.is_float and algorithms.get(p.algorithm).external:
            if name not in self.external:
                return algorithms.get(p.algorithm).simulate(None, p, None)  # raises: no checkpoint loaded
            return self.external[name][0].to(weight_device(self.modules[name]), torch.float32)
        key = (name, p)
        if key not in self._sim and not p.is_float and self._kept(p):
            self.prepare([(name, p)])
        if key in self._sim:
            return self._sim[key].to(weight_device(self.modules[name]), torch.float32)
        W = self.original(name)
        if p.is_float:
            return W
        return algorithms.get(p.algorithm).simulate(W, p, self._inputs(name, p))

    @staticmethod
    def _kept(p: Precision) -> bool:
        """A search or a sweep (not plain min/max rounding): computed once, a CPU copy kept."""
        return p.alg.kept

    def simulate_options(self, options: Dict[str, Dict[str, Precision]],
                         keep: bool = True) -> Dict[str, Dict[str, torch.Tensor]]:
        """module -> label -> simulated weight (in the weight's own dtype) of every option, modules
        that read one input simulated together. ``keep``: the bank keeps them for the trials (the
        kept copy itself is returned, not another); else they are handed back where they were
        computed (the accelerator) and dropped with the caller's reference: a chunk of a model's
        options scored and gone, no host copy."""
        items = [(n, p) for n, o in options.items() for p in o.values()]
        fresh: dict = {}
        self.prepare(items, out=None if keep else fresh)

        def get(n, p):
            if (n, p) in fresh:
                return fresh[(n, p)]
            if (n, p) in self._sim:
                return self._sim[(n, p)]
            q = self.simulate(n, p)
            return q.to("cpu", self.originals[n].dtype) if keep else q.to(dtype=self.originals[n].dtype)
        return {n: {lab: get(n, p) for lab, p in o.items()} for n, o in options.items()}

    def option_bytes(self, name: str, n_options: int) -> int:
        """Bytes the simulated weights of ``n_options`` options of module ``name`` take."""
        w = self.originals[name]
        return w.numel() * w.element_size() * n_options

    def prepare(self, items, out: Optional[dict] = None) -> None:
        """Compute the kept simulations of ``items`` ((module, precision) pairs). GPTQ-like
        algorithms simulate the modules that read one input in one call (rows are independent
        given the input's Hessian: one column sweep over the stacked rows), and the stack is always
        every planned module that reads the input, whichever were asked for: the float rounding
        depends on the stack's shape, so a module's simulated weight must not depend on which
        trials came before (a resumed run measures what the uninterrupted one did). On the CPU the
        jobs run in parallel, one thread each (the same arithmetic whatever the number of jobs); on an
        accelerator one after another, their imatrix scales searched first, many modules at once, and on
        CUDA the GPTQ stacks of one shape swept in fixed batches (``_sweep_together``).
        ``out``: a dict that receives the results instead of the bank keeping them."""
        jobs = self._jobs(items)
        if not jobs:
            return
        if not self._on_cpu(jobs):
            self._search_scales_together(jobs)
            for ps, names in self._sweep_together(jobs, out).values():
                self._run_job(ps, names, out=out)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if threads > 1 and len(jobs) > 1:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda job: self._run_job(*job, flush_denormal=True, out=out), jobs.values()))
            else:
                for ps, names in jobs.values():
                    self._run_job(ps, names, flush_denormal=True, out=out)
        finally:
            torch.set_num_threads(threads)

    def _jobs(self, items) -> Dict[tuple, Tuple[List[Precision], List[str]]]:
        """The simulations ``items`` need, as jobs of (precisions, modules): the GPTQ family's
        precisions of one input in one job over every planned module that reads it (one sweep serves
        them all), any other precision of one module alone."""
        jobs: Dict[tuple, Tuple[List[Precision], List[str]]] = {}
        groups = self.stats.groups() if self.stats is not None else {}
        for n, p in items:
            if p.is_float or (n, p) in self._sim or n not in self.modules or algorithms.get(p.algorithm).external \
                    or not self._kept(p):
                continue
            alg = algorithms.get(p.algorithm)
            if alg.simulate_many is not None and self.stats is not None and n in self.stats.module_input:
                key = self.stats.module_input[n]
                together = alg.sweeps_options_together
                ps, _ = jobs.setdefault(("stack", key) + (() if together else (p,)),
                                        ([], [m for m in groups[key] if m in self.modules]))
                if p not in ps:
                    ps.append(p)
            else:
                jobs.setdefault(("one", n, p), ([p], [n]))
        return jobs

    def _on_cpu(self, jobs) -> bool:
        return all(weight_device(self.modules[names[0]]).type == "cpu" for _, names in jobs.values())

    def _search_scales_together(self, jobs) -> None:
        """An accelerator's scale searches for ``jobs``, batched across modules
        (``algorithms.search_scales_together``, which picks the searches it batches): the jobs then find
        their scales searched."""
        algorithms.search_scales_together([(lambda n=n: self.original(n), self.originals[n].numel(), p,
                                            self._inputs(n, p)) for ps, names in jobs.values() for p in ps
                                           for n in names])

    def _sweep_together(self, jobs, out: Optional[dict]) -> dict:
        """CUDA's GPTQ jobs swept in batched engine calls (``algorithms.gptq_batch``): per stack shape and
        precision one call over every stack of that shape in the bank (``_batches``; stacks within
        ``SWEEP_TOGETHER_MAX``), where each stack was its own call (the demo's 120 stacks x 8 GPTQ options on an H100: 960 calls
        6.5 s -> 32 calls 1.0 s, the options' bench with ``--time-calls``).
        The engine's batched sweep does not round every weight as its single sweep does (a grid step, 0.06
        the largest in ``bench_option_sim.py --compare gptq``), so the batches are fixed, not made of what was
        asked: a module's weights never depend on what else was simulated with it (a trial after a cached
        diagnosis measures what one after a fresh diagnosis did). The results asked for are stored as
        ``_run_job`` stores them; returns the jobs left."""
        gptq = {k: job for k, job in jobs.items() if k[0] == "stack"
                and algorithms.get(job[0][0].algorithm).sweeps_options_together and self._batched(job[1])}
        if not gptq:
            return jobs
        asked: Dict[tuple, set] = {}  # (stack shape, precision) -> the stacks (input keys) asked for
        for key, (ps, names) in gptq.items():
            for p in ps:
                asked.setdefault((self._stack_shape(names), p), set()).add(key[1])
        batches = self._batches()
        for (shape, p), keys in asked.items():
            for chunk in batches[shape]:
                if keys.isdisjoint(chunk):
                    continue
                outs = algorithms.gptq_batch([[self.original(n) for n in names] for names in chunk.values()], p,
                                             [[self._inputs(n, p) for n in names] for names in chunk.values()])
                for (k, names), q in zip(chunk.items(), outs):
                    if k in keys or out is None:  # kept: the batch's other stacks too (computed, valid)
                        self._store({p: q}, names, out if k in keys else None)
        return {k: job for k, job in jobs.items() if k not in gptq}

    def _stack_shape(self, names: List[str]) -> tuple:
        w = self.originals[names[0]]
        return sum(self.originals[n].shape[0] for n in names), w.shape[1], w.dtype

    def _batched(self, names: List[str]) -> bool:
        """Whether the stack of ``names`` is swept in ``_sweep_together``'s batches."""
        rows, cols, _ = self._stack_shape(names)
        return weight_device(self.modules[names[0]]).type in SWEEP_TOGETHER_ON and rows * cols <= SWEEP_TOGETHER_MAX

    def _batches(self) -> Dict[tuple, List[Dict[str, List[str]]]]:
        """Stack shape -> its batches ({input key: the modules that read it}), every stack of the bank in
        model order, each batch's weights and Hessians within ``algorithms.GPTQ_BATCH_BYTES``."""
        by_shape: Dict[tuple, List[Tuple[str, List[str]]]] = {}
        for key, members in self.stats.groups().items():
            names = [m for m in members if m in self.modules]
            if names and self._batched(names):
                by_shape.setdefault(self._stack_shape(names), []).append((key, names))
        out: Dict[tuple, List[Dict[str, List[str]]]] = {}
        for shape, stacks in by_shape.items():
            rows, cols, _ = shape
            out[shape] = [dict(stacks[i] for i in group) for group in
                          scales.batches([4 * (rows * cols + cols * cols)] * len(stacks), algorithms.GPTQ_BATCH_BYTES)]
        return out

    def _keep(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """A simulation as kept: in the weight's own dtype, on its accelerator while there is room."""
        dtype = self.originals[name].dtype
        dev = weight_device(self.modules[name])
        if not device_room(dev, q.numel() * dtype.itemsize, SIM_DEVICE_RESERVE):
            dev = torch.device("cpu")
        return q.to(dev, dtype)

    def _run_job(self, ps: List[Precision], names: List[str], flush_denormal: bool = False,
                 out: Optional[dict] = None) -> None:
        """Simulate ``names`` at every precision of ``ps`` and keep the results. ``flush_denormal``
        (CPU): the inverse Hessians and clipping statistics of inputs with massive activations (the
        demo's 3000x channels) are full of denormal floats, which the CPU computes ~15x slower (one
        demo down_proj GPTQ: 12.9 s -> 0.7 s); flushed (per thread, and it stays on) they change
        nothing measurable."""
        if flush_denormal:
            torch.set_flush_denormal(True)
        alg = algorithms.get(ps[0].algorithm)
        if alg.sweeps_options_together:
            Ws = [self.original(n) for n in names]
            results = algorithms.gptq_options(Ws, ps, {p: [self._inputs(n, p) for n in names] for p in ps})
        elif alg.simulate_many is not None:
            results = {ps[0]: alg.simulate_many([self.original(n) for n in names], ps[0],
                                                [self._inputs(n, ps[0]) for n in names])}
        else:
            results = {ps[0]: [alg.simulate(self.original(names[0]), ps[0], self._inputs(names[0], ps[0]))]}
        self._store(results, names, out)

    def _store(self, results: Dict[Precision, List[torch.Tensor]], names: List[str], out: Optional[dict]) -> None:
        """A job's results ({precision: one weight per module of ``names``}): kept, or handed to ``out``."""
        for p, outs in results.items():
            for n, q in zip(names, outs):
                if out is None:
                    self._sim[(n, p)] = self._keep(n, q)
                else:  # handed back, not kept (option chunks): where it was computed, in the weight's dtype
                    out[(n, p)] = q.to(dtype=self.originals[n].dtype)

    def use_tuned(self, plan: Plan, weights: Dict[str, torch.Tensor],
                     qparams: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        """Serve the given weights (tuned for the whole plan: AutoRound) for the plan's precisions;
        ``qparams`` (module -> scale, zero point) are what a static export packs them with. A module
        live at that precision (another tuning's weights) is rewritten by the next ``apply``."""
        for n, w in weights.items():
            self._sim[(n, plan.modules[n])] = self._keep(n, w)
            if self.current.get(n) == plan.modules[n]:
                self._stale.add(n)
        for n, (scale, zero) in (qparams or {}).items():
            self._tuned_qp[(n, plan.modules[n])] = (scale.cpu(), zero.cpu())

    def use_external(self, weights: Dict[str, torch.Tensor],
                     qparams: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Serve an existing checkpoint's (dequantized) weights for its modules' ckpt precisions,
        and export them with its integer grid (``qparams``: scale, zero point per group)."""
        for n, w in weights.items():
            s, z = qparams[n]
            self.external[n] = (w.to("cpu", self.originals[n].dtype), s.cpu(), z.cpu())

    @torch.no_grad()
    def reround_external(self, plan: Plan) -> List[str]:
        """Serve the modules of ``plan`` at ``ckpt_approx`` precisions (a grid compressed-tensors
        cannot hold, e.g. NF4) as the export will write them: re-rounded to their fitted integer
        grid, exactly as compressed-tensors fake-quantizes. Until then they are the checkpoint as
        downloaded (what its diagnosis measures); from then on every trial measures what ships.
        Returns the modules changed (a second call changes none)."""
        from quantfix.quantize import scales

        done = []
        for n, p in plan.modules.items():
            if p.is_float or not p.alg.rerounded_at_export or n not in self.external or n in self._rerounded:
                continue
            w, sc, z = self.external[n]
            dt = self._dtype(n)  # integers in the checkpoint's dtype, as the engine packs them
            q = scales.quantize_with(w.to(dt), sc.to(dt), z.to(dt), p.bits, p.group_size, out_dtype=w.dtype)
            self.external[n] = (q, sc, z)
            self._rerounded.add(n)
            if self.current.get(n) == p:
                self._stale.add(n)
            done.append(n)
        return done

    def quantized_weights(self, plan: Plan) -> "LazyWeights":
        """The simulated weight of every quantized module of the plan, without applying it: a
        mapping that computes each when asked (where the module computes, in its dtype), so the
        plan's weights are never all held at once (an 8B model's: 14 GB)."""
        todo = {n: p for n, p in plan.modules.items() if n in self.modules and not p.is_float}
        self.prepare(list(todo.items()))  # kept ones (searched, calibrated) at once: parallel on the CPU
        return LazyWeights(self, todo)

    @torch.no_grad()
    def apply(self, plan: Plan, progress: bool = True) -> int:
        """Make the live model compute with the plan's (simulated) weights; returns modules rewritten."""
        todo = [n for n in self.modules
                if plan.modules.get(n, Precision()) != self.current.get(n, Precision()) or n in self._stale]
        self.prepare([(n, plan.modules.get(n, Precision())) for n in todo])
        for n in tqdm(todo, desc="apply plan", unit="module", disable=not progress or len(todo) < 20, leave=False):
            p = plan.modules.get(n, Precision())
            set_weight(self.modules[n], self.simulate(n, p))
            self.current[n] = p
            self._stale.discard(n)
            if not p.is_float and p.alg.activation is not None and n not in self._act_hooks:
                self._act_hooks[n] = self.modules[n].register_forward_pre_hook(self._activation_hook(n))
        return len(todo)

    def _activation_hook(self, name: str):
        """Round the module's input as its applied precision's matmul does (a llama.cpp type: ggml
        quantizes activations to Q8_0 / Q8_K, quantize/gguf.py); nothing for other precisions, or
        when the float weight is live."""
        def hook(_module, args):
            p = self.current.get(name)
            if p is None or p.is_float or p.alg.activation is None:
                return None
            return (p.alg.activation(args[0]),) + tuple(args[1:])
        return hook

    @torch.no_grad()
    def apply_rtn(self, modules: Dict[str, Precision]) -> None:
        """Make the given modules compute with plain min/max RTN at their widths, computed afresh
        (not the simulations kept for their precisions: those may be an external checkpoint's
        weights). The next ``apply`` rewrites them."""
        rtn = algorithms.get("rtn")
        for n, p in modules.items():
            q = Precision(p.bits, p.group_size, p.symmetric, "rtn")
            set_weight(self.modules[n], rtn.simulate(self.original(n), q, self._inputs(n, q)))
            self._stale.add(n)

    def float_weights(self, plan: Plan) -> Dict[str, torch.Tensor]:
        """The float (CPU) weight of every module the plan quantizes."""
        return {n: self.originals[n] for n, p in plan.modules.items() if n in self.modules and not p.is_float}

    def export_tensors(self, plan: Plan) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For every module whose algorithm exports statically: (simulated weight, scale, zero point)
        on the CPU, exactly what the trials measured, for the engine to pack."""
        todo = [(n, p) for n, p in plan.modules.items()
                if n in self.modules and not p.is_float and p.alg.static_export]
        self.prepare(todo)
        out = {}
        for n, p in todo:
            if algorithms.get(p.algorithm).external:
                out[n] = self.external[n]
                continue
            scale, zero = self._tuned_qp.get((n, p)) or self.qparams(n, p)
            # the kept simulation itself where there is one (no copy: an 8B plan's weights are 14 GB),
            # else computed now; in the weight's dtype, which holds the simulated values exactly
            w = self._sim[(n, p)] if (n, p) in self._sim else self.simulate(n, p).to("cpu", self.originals[n].dtype)
            out[n] = (w, scale.cpu(), zero.cpu())
        return out

    def qparams(self, name: str, p: Precision) -> Tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point the simulation of ``name`` at ``p`` rounds with (searched once)."""
        return algorithms.get(p.algorithm).qparams(self.original(name), p, self._inputs(name, p))

    def release(self) -> None:
        """Drop everything the bank holds (float originals, kept simulations, a checkpoint's weights)
        once the plan is exported: the export and the reload get the memory. Restore first: the
        bank cannot be used afterwards."""
        for h in self._act_hooks.values():
            h.remove()
        self._act_hooks.clear()
        self.originals.clear()
        self._sim.clear()
        self._qp.clear()
        self._awq.clear()
        self._tuned_qp.clear()
        self.external.clear()
        self.stats = None

    def use_stats(self, stats: Optional[CalibStats], aside: Optional[dict] = None) -> dict:
        """New calibration statistics (recalibration): the float weights go back in and every cached
        simulation is dropped. Returns what was dropped: handed back as ``aside`` with the statistics
        it was computed from (an undone recalibration), it is served again instead of simulated anew."""
        self.restore()
        dropped = {"stats": self.stats, "awq": self._awq, "sim": self._sim, "qp": self._qp, "tuned_qp": self._tuned_qp}
        self.stats = stats
        self._awq, self._sim, self._qp, self._tuned_qp = {}, {}, {}, {}
        if aside is not None and aside["stats"] is stats:
            self._awq, self._sim, self._qp, self._tuned_qp = aside["awq"], aside["sim"], aside["qp"], aside["tuned_qp"]
        return dropped

    def forget_simulations(self) -> None:
        """Drop the cached simulated weights (host memory), e.g. between unrelated plans."""
        self._sim.clear()
        self._qp.clear()

    def forget_applied(self) -> None:
        """Say that the live model holds the float weights again (someone restored them directly)."""
        self.current.clear()
        self._stale.clear()

    @torch.no_grad()
    def restore(self) -> None:
        for n, m in self.modules.items():
            if not self.current.get(n, Precision()).is_float or n in self._stale:
                set_weight(m, self.originals[n])
        self.current.clear()
        self._stale.clear()

    def output_error(self, name: str, p: Precision) -> float:
        """Calibration-set output error ||(W - Wq) X||^2 of one module under precision p (0 if no stats)."""
        if self.stats is None or name not in self.stats.module_input or p.is_float:
            return 0.0
        W = self.original(name)
        return fake.output_error(W, self.simulate(name, p), self.stats.of(name).full().to(W.device))
