"""One entry per quantization algorithm: how it simulates, how it exports, its label and its cost.

Adding an algorithm means adding one ``Algorithm`` to ``REGISTRY`` (and its test): the config
check, the plan's labels and sizes, the simulated trial weights and the exported checkpoint all
read it from here. The tensor math lives in ``fake.py`` and ``scales.py``; the engines are
imported lazily.

compressed-tensors algorithms mix freely within one plan and one checkpoint (llm-compressor's
QuantizationModifier, one config group per precision and observer). Round-to-nearest with min/max
or mse clipping exports through the engine's own observers, which the simulation reproduces bit for
bit (``scales.py``). GPTQ (llm-compressor's own column sweep, ``_gptq_sweep``) and imatrix clipping
learn from the calibration data: those modules export *statically*, the engine packing the
simulated weights with the simulation's scales, so the checkpoint is exactly what the trials
measured and the export needs no calibration pass.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from quantfix.errors import QuantfixError
from quantfix.quantize import fake, gguf, scales
from quantfix.quantize.stats import InputStats

FLOAT_BITS = 16
COMPRESSED_TENSORS = "compressed-tensors"
BITSANDBYTES = "bitsandbytes"
GGUF = "gguf"  # llama.cpp: written by llama-quantize from the float GGUF
# ours -> llm-compressor's weight observer; "static" hands the engine the scales quantfix chose
OBSERVERS = {"minmax": "memoryless_minmax", "mse": "mse", "imatrix": "imatrix_mse", "static": "quantfix_static"}


@dataclass
class SimInputs:
    """What a simulation may use besides the weight: the module's calibration statistics (None
    without calibration data), the AWQ scales of its input (computed on demand), the dtype the
    model stores weights in (the engine's observers compute in it) and the knobs."""

    stats: Optional["InputStats"] = None
    awq_scales: Callable[[], Optional[torch.Tensor]] = lambda: None
    gptq_damp: float = 0.01
    gptq_block: int = 128
    int8_threshold: float = 6.0
    dtype: Optional[torch.dtype] = None  # None: the weight's own
    # scales already searched for this module, by (method, bits, group, symmetric): imatrix and
    # gptq_imatrix at one width round with the same scales, searched once
    qparams_cache: Optional[dict] = None

    def importance(self) -> Optional[torch.Tensor]:
        """E[x^2] per input channel (the imatrix), from the calibration Hessian's diagonal."""
        if self.stats is None:
            return None
        return self.stats.diagonal().float() / max(1, self.stats.n_tokens)


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str  # the checkpoint format: compressed-tensors (llm-compressor) or bitsandbytes
    summary: str  # one line for errors and docs
    bits: Tuple[int, ...]  # the integer widths it supports
    simulate: Callable[[torch.Tensor, "Precision", SimInputs], torch.Tensor]
    # storage bits per weight for a module with in_features inputs (scales, zero points included)
    bits_per_weight: Callable[["Precision", int], float]
    label: Callable[["Precision"], str]
    observer: str = "minmax"  # compressed-tensors: the weight-scale search (scales.METHODS)
    # compressed-tensors: transforms that run before quantization for the whole plan (AWQ smoothing)
    transforms: Optional[Callable[[object], list]] = None
    # transformers' BitsAndBytesConfig for a bitsandbytes plan: (skipped modules, compute dtype, quant config)
    bnb_config: Optional[Callable[[List[str], torch.dtype, object], object]] = None
    calibrated: bool = False  # simulation and export read calibration data
    # modules that read one input simulated in one call: ([W_1, ...], p, [inputs_1, ...]) -> [Q_1, ...]
    simulate_many: Optional[Callable[[List[torch.Tensor], "Precision", List[SimInputs]], List[torch.Tensor]]] = None
    fixed_group: Optional[Callable[[int], int]] = None  # the group size it forces (None: any valid size)
    mixable: bool = True  # may share a plan with other algorithms of its family
    export_needs_cuda: bool = False
    # compressed-tensors: the export takes the simulated weights and their scales as they are (the
    # engine packs them) instead of quantizing again from calibration data: exact and data-free
    static_export: bool = False
    # simulated one module at a time (False: its weights come from tuning a whole plan)
    per_module: bool = True
    # not per module: the setting that runs it on the chosen plan
    whole_plan_setting: str = ""
    # the export writes the trial's weights bit for bit (False: it re-rounds them, e.g. an existing
    # checkpoint's float-minimum grid, so the reloaded metrics may differ a little from the trial's)
    exact_export: bool = True
    # the weights are an existing checkpoint's own (quantized.name_or_path), served by the bank
    external: bool = False
    # simulating it needs the full calibration Hessian [in, in] (GPTQ's sweep, AWQ's loss), not only
    # its diagonal (the imatrix's E[x^2]): without one in the run, only the diagonal is collected
    needs_hessian: bool = False
    # gguf: the llama.cpp tensor type it writes, and the rounding its matmul applies to the module's
    # input (quantize/gguf.py: ggml quantizes activations to Q8_0 / Q8_K), which the trials simulate
    ggml_type: Optional[str] = None
    activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def qparams(self, W: torch.Tensor, p: "Precision", inputs: SimInputs):
        """The per-group scale and zero point the simulation rounds with (from the float weight)."""
        return _qparams(W.to(inputs.dtype or W.dtype), p, inputs, self.observer)

    @property
    def export_observer(self) -> str:
        return "static" if self.static_export else self.observer

    # ---- questions callers ask (instead of combining the flags above) -------------------------
    @property
    def sweeps_options_together(self) -> bool:
        """Several of its precisions of one input are simulated in one call (``gptq_options``)."""
        return self.needs_hessian and self.simulate_many is not None

    @property
    def exports_exactly(self) -> bool:
        """The checkpoint holds the trial's weights bit for bit: compressed-tensors, written as
        simulated (static) or by an engine observer the simulation reproduces (data-free RTN)."""
        return self.family == COMPRESSED_TENSORS and self.exact_export and (self.static_export or not self.calibrated)

    @property
    def kept(self) -> bool:
        """Its simulation is a search or a sweep (not plain min/max rounding): computed once and kept."""
        return self.observer != "minmax" or self.calibrated

    @property
    def rerounded_at_export(self) -> bool:
        """An existing checkpoint's weights on a grid compressed-tensors cannot hold (re-rounded at export)."""
        return self.external and not self.exact_export

    @property
    def tunable(self) -> bool:
        """AutoRound may tune it: integer weights in compressed-tensors, not an existing checkpoint's own
        (a repair keeps the modules it leaves alone exactly)."""
        return self.family == COMPRESSED_TENSORS and not self.external

    @property
    def learns_from_data(self) -> bool:
        """A compressed-tensors rounding that learns from the calibration data (its benefit over plain
        RTN at the same width is what a calibration mismatch removes)."""
        return self.calibrated and self.family == COMPRESSED_TENSORS

    @property
    def calibrates_at_export(self) -> bool:
        """The engine quantizes it again from calibration data at export (AWQ's smoothing)."""
        return self.calibrated and not self.static_export

    @property
    def llama_cpp(self) -> bool:
        """A llama.cpp tensor type (the GGUF export's; simulated with ggml's own quantizer)."""
        return self.family == GGUF

    def start_problem(self) -> Optional[str]:
        """Why it cannot be plan 0's algorithm (``quant.algorithm``), or None."""
        if self.external:
            return (f"{self.name} names an existing checkpoint's own weights: pass the checkpoint as "
                    "quantized.name_or_path=<dir or .gguf> instead")
        if not self.per_module:
            return f"{self.name} rounds a whole plan: start from another algorithm and set {self.whole_plan_setting}"
        return None

    def option_problem(self) -> Optional[str]:
        """Why it cannot be one of the roundings a module moves to (``loop.algorithms``), or None."""
        if self.external:
            return "names an existing checkpoint's own weights, not a way to round"
        if not self.per_module:
            return f"rounds a whole plan, not one module: set {self.whole_plan_setting} instead"
        if not self.mixable:
            return f"applies to a whole plan: use it as quant={self.name} instead"
        if self.llama_cpp:
            return f"is a llama.cpp type: in GGUF mode (export.format=gguf) list it in loop.gguf_ladder as {self.ggml_type}"
        return None

    def check_bits(self, bits: int) -> Optional[str]:
        if bits in self.bits:
            return None
        allowed = f"{self.bits[0]}..{self.bits[-1]}" if len(self.bits) > 2 else "/".join(map(str, self.bits))
        return f"{self.name} supports bits {allowed} (got {bits})"


# ---- sizes and labels ---------------------------------------------------------------------------

def _int_bits(p: "Precision", in_features: int) -> float:
    group = p.group_size or in_features
    per_group = 16 + (0 if p.symmetric else p.bits)  # a 16-bit scale, plus a zero point if asymmetric
    return p.bits + per_group / group


def _int_label(p: "Precision") -> str:
    g = f"g{p.group_size}" if p.group_size else "ch"
    return f"W{p.bits}{g}{'' if p.symmetric else 'a'}"


def _tagged(tag: str) -> Callable[["Precision"], str]:
    return lambda p: f"{_int_label(p)}-{tag}"


# ---- simulations --------------------------------------------------------------------------------

_QP_LOCK = threading.Lock()


class _Searching:
    """A scale search under way in another thread: its result once ``done`` is set."""

    def __init__(self):
        self.done, self.value, self.failed = threading.Event(), None, False


def _qparams(W, p, inputs: SimInputs, method: str):
    """The observer's scales of ``W`` at ``p``, searched once per module, width and method: the
    bank's CPU threads simulate a module's imatrix option and its GPTQ option (whose sweep starts
    from the same scales) at once, and each used to search them (22-26 of 92-96 searches on a tiny
    Llama were repeats); a thread asking for a search under way waits for it."""
    key = (method, p.bits, p.group_size, p.symmetric, W.dtype)
    cache = inputs.qparams_cache if inputs.qparams_cache is not None else {}
    with _QP_LOCK:
        entry = cache.get(key)
        mine = entry is None
        if mine:
            entry = cache[key] = _Searching()
    if not mine:
        entry.done.wait()
        if entry.failed:  # the search raised there: search here, to raise the same error
            return _search(W, p, inputs, method)
        return entry.value
    try:
        entry.value = _search(W, p, inputs, method)
    except BaseException:
        entry.failed = True
        raise
    finally:
        entry.done.set()
    return entry.value


def search_scales_together(items) -> None:
    """The imatrix scales of many modules and widths at once, put in each module's scale cache
    (``SimInputs.qparams_cache``) where ``_qparams`` then finds them: one batched grid search per width
    (``scales.search_imatrix_many``, the same scales bit for bit) instead of one per module and width.
    For accelerators, where each search is a short sequence of tiny kernels. ``items``: (a function
    fetching the float weight to where it is searched, its number of elements, its precision, its
    SimInputs); a batch's weights are fetched when it runs (within ``scales.BATCH_ELEMENTS``), never all
    at once. Other observers, scales already cached and inputs without a dtype are left to ``_qparams``."""
    todo: Dict[tuple, dict] = {}
    for fetch, numel, p, inputs in items:
        if get(p.algorithm).observer != "imatrix" or inputs.qparams_cache is None or inputs.dtype is None:
            continue
        key = ("imatrix", p.bits, p.group_size, p.symmetric, inputs.dtype)
        if key not in inputs.qparams_cache:
            todo.setdefault(key, {})[id(inputs.qparams_cache)] = (fetch, numel, inputs)
    for key, entries in todo.items():
        _, bits, group_size, symmetric, dtype = key
        found = list(entries.values())
        for group in scales.batches([numel for _, numel, _ in found]):
            batch = [found[k] for k in group]
            results = scales.search_imatrix_many([f().to(dtype) for f, _, _ in batch], bits, group_size, symmetric,
                                                 [inp.importance() for _, _, inp in batch])
            for (_, _, inp), value in zip(batch, results):
                entry = _Searching()
                entry.value = value
                entry.done.set()
                with _QP_LOCK:
                    inp.qparams_cache.setdefault(key, entry)


def _search(W, p, inputs: SimInputs, method: str):
    imp = inputs.importance() if method == "imatrix" else None
    return scales.search_qparams(W, p.bits, p.group_size, p.symmetric, method, importance=imp)


def _rtn_with(method: str):
    """Round to nearest with the observer's scales, computed in the model's weight dtype (as the
    engine does), returned in the dtype the weight came in."""
    def sim(W, p, inputs: SimInputs):
        Wn = W.to(inputs.dtype or W.dtype)
        scale, zero = _qparams(Wn, p, inputs, method)
        return scales.quantize_with(Wn, scale, zero, p.bits, p.group_size, out_dtype=W.dtype)
    return sim


def _gptq_many(method: str):
    """GPTQ of the modules that read one input, in one column sweep over their stacked rows (rows
    are independent given the input's Hessian); each module's scales come from its own weight, as
    the engine's observer computes them. Without statistics: RTN with the same scales."""
    def sim(Ws, p, inputs_list: List[SimInputs]):
        qps = [_qparams(W.to(inp.dtype or W.dtype), p, inp, method) for W, inp in zip(Ws, inputs_list)]
        inputs = inputs_list[0]
        if inputs.stats is None:
            return [scales.quantize_with(W.to(inputs.dtype or W.dtype), s, z, p.bits, p.group_size, out_dtype=W.dtype)
                    for W, (s, z) in zip(Ws, qps)]
        W, scale, zero = _stacked(Ws, qps)
        Q = _gptq_sweep(W, inputs.stats.full().to(W.device), p, scale, zero, inputs.gptq_damp, inputs.gptq_block)
        return [q.to(w.dtype) for q, w in zip(Q.split([w.shape[0] for w in Ws]), Ws)]
    return sim


def _stacked(Ws, qps):
    """A stack's rows and its modules' scales and zero points, concatenated in float32 (the scales' values
    stay those of the export dtype: the sweep's q * scale is then exact, as the checkpoint's
    dequantization in the reload dtype is)."""
    return (torch.cat([w.float() for w in Ws]), torch.cat([s.float() for s, _ in qps]),
            torch.cat([z.float() for _, z in qps]))


def _engine_args(p: "Precision"):
    """The engine's ``QuantizationArgs`` for an integer precision, static activation order (columns swept
    by descending Hessian diagonal, groups kept in the columns' own order, as the export stores them)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=p.bits, type="int", symmetric=p.symmetric,
                            strategy="group" if p.group_size else "channel", group_size=p.group_size or None,
                            actorder="static")


# a batched CPU sweep keeps every option's weights, scales and zero points per column at once:
# options are swept together within this many bytes of those (an 8B down_proj at 9 options: 6 GB)
GPTQ_BATCH_BYTES = 2 ** 30


def gptq_options(Ws, precisions: List["Precision"], inputs: Dict["Precision", List[SimInputs]]):
    """GPTQ of the modules that read one input (their rows stacked) at several precisions of the
    GPTQ family: {precision: [one weight per module]}. On the CPU one sweep serves them all
    (``gptq.sweep``: one activation order and factorization, one column loop; bit for bit the
    engine's single-option sweep); on CUDA the engine's Triton sweep runs per precision."""
    first = inputs[precisions[0]][0]
    if first.stats is None or Ws[0].device.type == "cuda":
        return {p: get(p.algorithm).simulate_many(Ws, p, inputs[p]) for p in precisions}
    from quantfix.quantize import gptq

    W = torch.cat([w.float() for w in Ws])
    H = first.stats.full().to(W.device)
    factors = gptq.factorize(H, W, first.gptq_damp)
    # weights, scales and zero points per column, float32, per option
    per_chunk = max(1, GPTQ_BATCH_BYTES // (3 * 4 * W.numel()))
    out = {}
    for i in range(0, len(precisions), per_chunk):
        chunk = precisions[i:i + per_chunk]
        qs = []
        for p in chunk:
            alg = get(p.algorithm)
            qps = [_qparams(w.to(inp.dtype or w.dtype), p, inp, alg.observer) for w, inp in zip(Ws, inputs[p])]
            qs.append(gptq.Quantizer(p.bits, p.group_size, p.symmetric, torch.cat([s.float() for s, _ in qps]),
                                     torch.cat([z.float() for _, z in qps])))
        for p, Q in zip(chunk, gptq.sweep(W, H, qs, first.gptq_damp, first.gptq_block, factors)):
            out[p] = [q.to(w.dtype) for q, w in zip(Q.split([w.shape[0] for w in Ws]), Ws)]
    return out


def gptq_batch(stacks: List[List[torch.Tensor]], p: "Precision", inputs: List[List[SimInputs]]) -> List[List[torch.Tensor]]:
    """GPTQ of several stacks of one shape at ``p`` (each stack: the modules that read one input, with their
    SimInputs, statistics required) in one batched engine ``quantize_weight`` call ([stacks, rows, columns])
    where each stack was its own call: on CUDA each call is a short kernel sequence (the demo's 120 stacks x
    8 GPTQ options). The caller bounds the batch's memory, and fixes which stacks go together: on CUDA the
    batched sweep rounds a few weights one grid step away from the single sweep's
    (``WeightBank._sweep_together``). Returns, per stack, one weight per module. Without the engine: one
    sweep per stack (``fake.gptq``)."""
    try:
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except ImportError:  # the engine is optional for simulation
        return [get(p.algorithm).simulate_many(mods, p, inps) for mods, inps in zip(stacks, inputs)]
    method = get(p.algorithm).observer
    Ws, Hs, Ss, Zs = [], [], [], []
    for mods, inps in zip(stacks, inputs):
        W, scale, zero = _stacked(mods, [_qparams(w.to(inp.dtype or w.dtype), p, inp, method)
                                         for w, inp in zip(mods, inps)])
        Ws.append(W)
        Hs.append(inps[0].stats.full().to(W.device).float())
        Ss.append(scale)
        Zs.append(zero)
    first = inputs[0][0]
    Q, _, _ = quantize_weight(torch.stack(Ws), torch.stack(Hs), torch.stack(Ss), torch.stack(Zs).to(torch.int8),
                              None, _engine_args(p), blocksize=first.gptq_block, percdamp=first.gptq_damp)
    return [[q.to(w.dtype) for q, w in zip(Q[k].split([w.shape[0] for w in mods]), mods)]
            for k, mods in enumerate(stacks)]


def _gptq_sweep(W, H, p, scale, zero, damp: float, block: int):
    """The GPTQ column sweep: llm-compressor's own ``quantize_weight`` (a Triton kernel on CUDA,
    several times faster than a per-column loop; 1.7x faster than ``fake.gptq`` on the CPU too),
    ``fake.gptq`` without the engine; the two agree bit for bit (tests/test_quantize_algorithms.py)."""
    try:
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except ImportError:  # the engine is optional for simulation
        return fake.gptq(W, H, p.bits, p.group_size, p.symmetric, (scale, zero), fake.GPTQOptions(damp, block))
    Q, _, _ = quantize_weight(W[None].clone(), H[None].float().clone(), scale[None], zero[None].to(torch.int8),
                              None, _engine_args(p), blocksize=block, percdamp=damp)
    return Q[0]


def _one_of(many):
    return lambda W, p, inputs: many([W], p, [inputs])[0]


def _sim_awq(W, p, inputs: SimInputs):
    s = inputs.awq_scales()
    if s is None:
        return fake.rtn(W, p.bits, p.group_size, p.symmetric)
    return fake.awq(W, s, p.bits, p.group_size, p.symmetric)


def _sim_external(W, p, inputs: SimInputs):
    raise QuantfixError(f"{p.label}: an existing checkpoint's weights come from the checkpoint (quantized.name_or_path); "
                        "a plan naming them needs that checkpoint loaded")


def _sim_llm_int8(W, _p, inputs: SimInputs):
    cols = None
    if inputs.stats is not None:
        cols = torch.nonzero(inputs.stats.absmax > inputs.int8_threshold).flatten().to(W.device)
    return fake.llm_int8_weight(W, cols)


def _sim_nf4(W, p, _inputs: SimInputs):
    return fake.nf4(W, p.group_size or 64)


def _tuned_only(W, p, _inputs: SimInputs):
    raise RuntimeError(f"{p.label}: AutoRound weights come from tuning the whole plan (quantize/autoround.py, "
                       "loop.tune=autoround), not from a per-module simulation")


def _whole_plan_only(W, p, _inputs: SimInputs):
    raise RuntimeError(f"{p.label}: sequential GPTQ weights come from rounding the whole plan layer by layer "
                       "(quantfix/sequential.py, loop.sequential_gptq), not from a per-module simulation")


# ---- exports --------------------------------------------------------------------------------------

def _awq_transforms(_q) -> list:
    from llmcompressor.modifiers.transform import AWQModifier

    return [AWQModifier()]


def _llm_int8_config(skip: List[str], _dtype, q):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.llm_int8_threshold, llm_int8_skip_modules=skip)


def _nf4_config(skip: List[str], dtype, _q):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


def _rtn_entry(name: str, method: str, summary: str, label) -> "Algorithm":
    # min/max and mse are data-free and the engine's own observers reproduce them bit for bit;
    # imatrix's statistics would come from the engine's own calibration pass: hand it ours instead
    return Algorithm(name, COMPRESSED_TENSORS, summary, INT_BITS, _rtn_with(method), _int_bits, label,
                     observer=method, calibrated=method == "imatrix", static_export=method == "imatrix")


def _gptq_entry(name: str, method: str, summary: str, label) -> "Algorithm":
    many = _gptq_many(method)
    return Algorithm(name, COMPRESSED_TENSORS, summary, INT_BITS, _one_of(many), _int_bits, label,
                     observer=method, calibrated=True, simulate_many=many, static_export=True, needs_hessian=True)


def _gguf_entry(type_name: str) -> "Algorithm":
    """A llama.cpp tensor type: simulated by ggml's own quantizer (the bytes llama-quantize writes,
    with the module's imatrix and the fallback for its row length), sized as llama.cpp stores it."""
    t = gguf.TYPES[type_name]

    def sim(W, p, inputs: SimInputs):
        return gguf.roundtrip(t.name, W, inputs.importance(), inputs.dtype or W.dtype).to(W.dtype)
    return Algorithm(gguf.algorithm_name(t.name), GGUF, f"llama.cpp {t.name} (ggml's quantizer, imatrix from the "
                     "calibration data; GGUF export)", (t.bits,), sim, lambda p, in_f: gguf.stored_bits(t.name, in_f),
                     lambda p: t.name, calibrated=True, fixed_group=lambda requested: t.block, ggml_type=t.name,
                     activation=gguf.activation(t.name))


INT_BITS = tuple(range(2, 9))

REGISTRY: Dict[str, Algorithm] = {a.name: a for a in (
    _rtn_entry("rtn", "minmax", "round to nearest, min/max scales", _int_label),
    _rtn_entry("mse", "mse", "round to nearest, clipping searched for the least weight error (llm-compressor 'mse' "
                             "observer)", _tagged("mse")),
    _rtn_entry("imatrix", "imatrix", "round to nearest, clipping searched for the least activation-weighted error "
                                     "(llm-compressor 'imatrix_mse' observer, E[x^2] from the calibration data)",
               _tagged("imx")),
    _gptq_entry("gptq", "minmax", "GPTQ: error-compensating rounding on the calibration Hessian, min/max scales",
                _tagged("gptq")),
    _gptq_entry("gptq_mse", "mse", "GPTQ with the mse clipping search", _tagged("gptq-mse")),
    _gptq_entry("gptq_imatrix", "imatrix", "GPTQ with the activation-weighted clipping search", _tagged("gptq-imx")),
    # AutoRound tunes the rounding and scales of a whole plan block by block: the loop's last step
    # (loop.tune=autoround), its weights handed to the bank and exported statically
    Algorithm("autoround", COMPRESSED_TENSORS, "AutoRound: rounding and scales tuned per decoder block on the "
              "calibration data (SignSGD), run on the plan the search chose", INT_BITS, _tuned_only, _int_bits,
              _tagged("ar"), calibrated=True, static_export=True, per_module=False,
              whole_plan_setting="loop.tune=autoround"),
    # sequential GPTQ re-rounds a chosen plan's GPTQ modules on the plan's own quantized inputs
    # (quantfix/sequential.py, loop.sequential_gptq), its weights handed to the bank and exported statically
    Algorithm("gptq_seq", COMPRESSED_TENSORS, "GPTQ run again layer by layer on the inputs of the plan's own quantized "
              "layers (llm-compressor's sequential order), each module's scales as its search chose", INT_BITS,
              _whole_plan_only, _int_bits, _tagged("gptq-seq"), calibrated=True, static_export=True, per_module=False,
              whole_plan_setting="loop.sequential_gptq=true"),
    Algorithm("awq", COMPRESSED_TENSORS, "AWQ: activation-aware per-channel scales (smoothing), then RTN", INT_BITS,
              _sim_awq, _int_bits, _tagged("awq"), transforms=_awq_transforms, calibrated=True,
              mixable=False, needs_hessian=True),
    # an existing checkpoint's own weights (quantized.name_or_path), kept as they are; ckpt: on an
    # integer grid that compressed-tensors stores bit for bit; ckpt_approx: a float-minimum or
    # non-uniform grid (Q4_1, K-quants, NF4...), re-rounded to the nearest integer grid at export
    Algorithm("ckpt", COMPRESSED_TENSORS, "the existing checkpoint's own weights (integer grid, exported exactly)",
              INT_BITS, _sim_external, _int_bits, _tagged("ckpt"), static_export=True, external=True),
    Algorithm("ckpt_approx", COMPRESSED_TENSORS, "the existing checkpoint's own weights (a grid compressed-tensors "
              "cannot hold exactly: re-rounded at export)", INT_BITS, _sim_external, _int_bits, _tagged("ckpt~"),
              static_export=True, exact_export=False, external=True),
    Algorithm("llm_int8", BITSANDBYTES, "LLM.int8 (bitsandbytes): int8 rows, outlier columns in float", (8,),
              _sim_llm_int8, lambda p, in_f: 8 + 32 / in_f, lambda p: "LLM.int8", bnb_config=_llm_int8_config,
              calibrated=True, fixed_group=lambda requested: 0, mixable=False),
    Algorithm("nf4", BITSANDBYTES, "NF4 (bitsandbytes): 4-bit normal-float blocks", (4,), _sim_nf4,
              lambda p, in_f: 4 + 32 / (p.group_size or 64), lambda p: f"NF4g{p.group_size or 64}",
              bnb_config=_nf4_config, fixed_group=lambda requested: requested or 64, mixable=False),
    *(_gguf_entry(t) for t in gguf.TYPES),
)}

NAMES = tuple(REGISTRY)
BNB_NAMES = tuple(n for n, a in REGISTRY.items() if a.family == BITSANDBYTES)
GGUF_NAMES = tuple(n for n, a in REGISTRY.items() if a.family == GGUF)


def for_ggml_type(type_name: str) -> Algorithm:
    """The registry entry that writes llama.cpp type ``type_name`` (Q4_K, Q5_0...)."""
    name = gguf.algorithm_name(type_name)
    if name not in REGISTRY:
        raise QuantfixError(f"llama.cpp type {type_name}: quantfix plans with {', '.join(gguf.TYPES)} (or F16)")
    return REGISTRY[name]


def get(name: str) -> Algorithm:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"algorithm={name!r}: choose one of {', '.join(NAMES)}") from None


def bits_problem(bits: int, allow_float: bool = False) -> Optional[str]:
    """The one rule for a module's width: 2..8 integer bits, or 16 (kept in float) where allowed."""
    if 2 <= bits <= 8 or (allow_float and bits == FLOAT_BITS):
        return None
    return f"bits={bits} is out of range: use 2..8" + (", or 16 to keep the module in float" if allow_float else "")


@dataclass(frozen=True)
class Precision:
    """How one module is stored. bits=16 means kept in float (not quantized)."""

    bits: int = FLOAT_BITS
    group_size: int = 0  # 0 = one scale per output channel
    symmetric: bool = True
    algorithm: str = "rtn"

    def __post_init__(self):
        object.__setattr__(self, "algorithm", str(self.algorithm))  # a config choice becomes its plain name
        problem = bits_problem(self.bits, allow_float=True)
        if problem:
            raise QuantfixError(problem)
        if self.algorithm not in REGISTRY:
            raise QuantfixError(f"algorithm={self.algorithm!r}: choose one of {', '.join(NAMES)}")
        if self.group_size < 0:
            raise QuantfixError(f"group_size={self.group_size}: use 0 (per channel) or a positive size")

    @property
    def is_float(self) -> bool:
        return self.bits >= FLOAT_BITS

    @property
    def alg(self) -> Algorithm:
        """Its algorithm's registry entry."""
        return get(self.algorithm)

    @property
    def label(self) -> str:
        return "FP16" if self.is_float else get(self.algorithm).label(self)

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight, scales (16 bit) and zero points included."""
        if self.is_float:
            return float(FLOAT_BITS)
        return get(self.algorithm).bits_per_weight(self, in_features)

    @property
    def family(self) -> str:
        return get(self.algorithm).family
