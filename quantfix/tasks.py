"""Downstream task metrics scored offline the way lm-evaluation-harness scores them.

Three tasks run from local files (``LOCAL_TASKS``): ``lambada_openai`` (acc, perplexity),
``arc_easy`` and ``piqa`` (acc, acc_norm). The prompts, continuations and metrics are those of
lm-eval's task YAMLs, and the log-likelihoods follow lm-eval's ``HFLM`` for causal models:

* trailing whitespace of the context moves to the continuation; the continuation tokens are
  ``encode(context + continuation)[len(encode(context)):]`` (``_encode_pair``), with the
  tokenizer's default special tokens, except none when the text already starts with the BOS
  text (``tok_encode``);
* an empty context is replaced by the BOS token (else EOS), as ``loglikelihood`` does;
* inputs longer than the model's context keep the last ``max_length + 1`` tokens;
* a continuation is greedy when every one of its tokens is the argmax.

``acc_norm`` divides each choice's log-likelihood by the choice text's length in characters
(without the leading space), as lm-eval's ``process_results`` does (``completion_len``).
Standard errors are lm-eval's ``mean_stderr`` (sample std / sqrt(n)); LAMBADA perplexity gets the
delta-method error ``ppl * std(ll) / sqrt(n)`` (lm-eval bootstraps it).

Any other task name goes through lm-evaluation-harness itself, when it is installed.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantfix.cache import CACHE_VERSION, atomic_write, digest, file_digest, load_entry
from quantfix.config import EvalConfig
from quantfix.errors import QuantfixError
from quantfix.weights import input_device

log = logging.getLogger(__name__)

LOCAL_TASKS = ("lambada_openai", "arc_easy", "piqa")
PRIMARY_METRIC = {"lambada_openai": "acc", "arc_easy": "acc_norm", "piqa": "acc_norm"}
# file of each local task, relative to data_dir
TASK_FILES = {
    "lambada_openai": "lambada_openai/lambada_test.jsonl",
    "arc_easy": "arc_easy/ARC-Easy-test.jsonl",
    "piqa": "piqa/valid.jsonl",
}
ACC_METRICS = ("acc", "acc_norm")
LOWER_IS_BETTER = ("perplexity",)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer has one


@dataclass
class TaskResult:
    task: str
    metrics: Dict[str, float]  # accuracies as fractions 0..1; lambada also has perplexity
    stderr: Dict[str, float]  # per metric, lm-eval style (sample std / sqrt(n))
    per_doc: Dict[str, List[float]]  # per-document 0/1 of each accuracy metric, in doc order
    n: int
    seconds: float
    doc_ids: List[int] = field(default_factory=list)  # index of each doc in its file

    def to_dict(self, per_doc: bool = False) -> dict:
        d = asdict(self)
        d["metrics"] = {k: round(v, 6) for k, v in self.metrics.items()}
        d["stderr"] = {k: round(v, 6) for k, v in self.stderr.items()}
        d["seconds"] = round(self.seconds, 2)
        if not per_doc:
            del d["per_doc"], d["doc_ids"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        return cls(task=d["task"], metrics=dict(d["metrics"]), stderr=dict(d["stderr"]),
                   per_doc={k: list(v) for k, v in d.get("per_doc", {}).items()}, n=int(d["n"]),
                   seconds=float(d["seconds"]), doc_ids=list(d.get("doc_ids", [])))


# ----------------------------------------------------------------------------------------- data

def task_path(task: str, data_dir: str, paths: Optional[Dict[str, str]] = None) -> Path:
    if task not in LOCAL_TASKS:
        raise QuantfixError(f"task {task!r} has no local data; local tasks: {', '.join(LOCAL_TASKS)}")
    if paths and paths.get(task):
        return Path(paths[task]).expanduser()
    return Path(data_dir).expanduser() / TASK_FILES[task]


def _read_jsonl(path: Path) -> List[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise QuantfixError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line")
    return rows


def _field(row: dict, key: str, path: Path, i: int):
    if key not in row:
        raise QuantfixError(f"{path}: line {i + 1} has no field {key!r}; see the task's README for the layout")
    return row[key]


def _lambada_docs(rows: List[dict], path: Path) -> List[dict]:
    docs = []
    for i, row in enumerate(rows):
        text = _field(row, "text", path, i)
        # lm-eval: doc_to_text = text.split(' ')[:-1] joined by ' ', doc_to_target = ' ' + last piece
        context, _, word = text.rpartition(" ")
        docs.append({"index": i, "context": context, "continuation": " " + word})
    return docs


def _arc_docs(rows: List[dict], path: Path) -> List[dict]:
    docs = []
    for i, row in enumerate(rows):
        choices = _field(row, "choices", path, i)
        key = _field(row, "answerKey", path, i)
        if key not in choices["label"]:
            raise QuantfixError(f"{path}: line {i + 1}: answerKey {key!r} is not one of {choices['label']}")
        docs.append({"index": i, "context": f"Question: {_field(row, 'question', path, i)}\nAnswer:",
                     "choices": list(choices["text"]), "gold": choices["label"].index(key)})
    return docs


def _piqa_docs(rows: List[dict], path: Path) -> List[dict]:
    labels: Optional[List[int]] = None
    if rows and "label" not in rows[0]:  # the authors' layout: labels in a sibling .lst file
        lpath = path.with_name(path.stem + "-labels.lst")
        if not lpath.exists():
            raise QuantfixError(f"piqa: labels file not found: {lpath} (it must sit beside {path.name}, "
                                f"or each row must have a 'label' field)")
        labels = [int(x) for x in lpath.read_text().split()]
        if len(labels) != len(rows):
            raise QuantfixError(f"piqa: {lpath} has {len(labels)} labels but {path} has {len(rows)} rows")
    docs = []
    for i, row in enumerate(rows):
        gold = labels[i] if labels is not None else int(_field(row, "label", path, i))
        if gold not in (0, 1):
            raise QuantfixError(f"piqa: doc {i} has label {gold}; expected 0 (sol1) or 1 (sol2)")
        docs.append({"index": i, "context": f"Question: {_field(row, 'goal', path, i)}\nAnswer:",
                     "choices": [_field(row, "sol1", path, i), _field(row, "sol2", path, i)], "gold": gold})
    return docs


_BUILDERS = {"lambada_openai": _lambada_docs, "arc_easy": _arc_docs, "piqa": _piqa_docs}


def subset_indices(n: int, limit: Optional[int], seed: int = 0) -> List[int]:
    """A fixed seeded random subset of range(n), sorted; all of it when limit is None, 0 or >= n."""
    if limit is not None and limit < 0:
        raise QuantfixError(f"task limit must be >= 0 (0 = all docs), got {limit}")
    if not limit or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def load_docs(task: str, data_dir: str, limit: Optional[int] = None, seed: int = 0,
              paths: Optional[Dict[str, str]] = None) -> List[dict]:
    """Docs of a local task: ``{"index", "context", "continuation"}`` (lambada) or
    ``{"index", "context", "choices", "gold"}`` (arc_easy, piqa)."""
    path = task_path(task, data_dir, paths)
    if not path.is_file():
        raise QuantfixError(f"{task}: data file not found: {path}; pass data_dir=... (the folder holding "
                            f"{TASK_FILES[task]}) or eval.task_paths.{task}=/path/to/{Path(TASK_FILES[task]).name}")
    docs = _BUILDERS[task](_read_jsonl(path), path)
    if not docs:
        raise QuantfixError(f"{task}: {path} holds no documents")
    return [docs[i] for i in subset_indices(len(docs), limit, seed)]


# ------------------------------------------------------------------------------ log-likelihoods

def _prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer, text: str, add_special_tokens: Optional[bool] = None) -> List[int]:
    """HFLM.tok_encode with add_bos_token unset."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    prefix = _prefix_token_id(tokenizer)
    if add_special_tokens is None and prefix is not None and text.startswith(tokenizer.decode(prefix)):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM makes them for a causal model."""
    if context == "":
        cont = _tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation)
    ctx = _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def max_length(model, tokenizer) -> int:
    """lm-eval's resolve_max_length: config n_positions / max_position_embeddings / n_ctx, then tokenizer."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    tml = getattr(tokenizer, "model_max_length", None)
    return int(tml) if tml is not None and tml < 10 ** 12 else DEFAULT_MAX_LENGTH


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: Sequence[Tuple[str, str]], batch_size: int = 8,
                   progress: bool = True, desc: str = "loglikelihood") -> List[Tuple[float, bool]]:
    """(sum log p(continuation | context), greedy) per (context, continuation) request, like HFLM.

    Requests are sorted longest first, right-padded and run batch_size at a time; only the
    continuation positions are log-softmaxed."""
    if batch_size < 1:
        raise QuantfixError(f"batch_size must be >= 1, got {batch_size}")
    max_len = max_length(model, tokenizer)
    encoded = []
    for ctx, cont in requests:
        ctx_enc, cont_enc = encode_pair(tokenizer, ctx, cont)
        if not cont_enc:
            raise QuantfixError(f"continuation {cont!r} encodes to no tokens after context {ctx[-40:]!r}")
        encoded.append(((ctx_enc + cont_enc)[-(max_len + 1):], cont_enc))  # lm-eval's left truncation
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: List[Optional[Tuple[float, bool]]] = [None] * len(encoded)
    device = input_device(model)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        inps = [encoded[i][0][:-1] for i in idx]
        width = max(len(x) for x in inps)
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for row, x in enumerate(inps):
            batch[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        logits = model(input_ids=batch.to(device), use_cache=False).logits
        for row, i in enumerate(idx):
            cont = encoded[i][1]
            end = len(inps[row])
            logp = F.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=logp.device)
            ll = float(logp.gather(1, target[:, None]).sum())
            # a NaN/Inf log-prob is never a greedy match (argmax would pick the NaN's index)
            out[i] = (ll, math.isfinite(ll) and bool((logp.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- metrics

def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n) (0 for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like np.argmax


def multiple_choice_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> Dict[str, float]:
    """acc: argmax of log-likelihood; acc_norm: argmax of log-likelihood / len(choice) in characters.
    A document with a non-finite log-likelihood (a NaN model) is scored wrong."""
    if not all(math.isfinite(ll) for ll in lls):
        return {"acc": 0.0, "acc_norm": 0.0}
    norm = [ll / float(len(c)) for ll, c in zip(lls, choices)]
    return {"acc": float(_argmax(lls) == gold), "acc_norm": float(_argmax(norm) == gold)}


def perplexity(lls: Sequence[float]) -> float:
    """lm-eval's perplexity aggregation: exp(-mean log-likelihood of the target)."""
    return math.exp(-sum(lls) / len(lls))


def _check_docs(task: str, docs: List[dict]) -> None:
    if task not in LOCAL_TASKS:
        raise QuantfixError(f"score_task runs local tasks only ({', '.join(LOCAL_TASKS)}), got {task!r}")
    if not docs:
        raise QuantfixError(f"{task}: no documents to score")
    need = "continuation" if task == "lambada_openai" else "choices"
    if need not in docs[0]:
        raise QuantfixError(f"{task}: docs have no {need!r}; build them with load_docs({task!r}, ...)")


def score_task(model, tokenizer, task: str, docs: List[dict], batch_size: int = 8,
               progress: bool = True) -> TaskResult:
    _check_docs(task, docs)
    t0 = time.perf_counter()
    if task == "lambada_openai":
        res = loglikelihoods(model, tokenizer, [(d["context"], d["continuation"]) for d in docs],
                             batch_size, progress, desc=task)
        lls = [ll for ll, _ in res]
        per_doc = {"acc": [float(g) for _, g in res]}
        ppl = perplexity(lls)
        metrics = {"acc": sum(per_doc["acc"]) / len(docs), "perplexity": ppl}
        stderr = {"acc": mean_stderr(per_doc["acc"]), "perplexity": ppl * mean_stderr(lls)}
    else:
        reqs = [(d["context"], " " + c) for d in docs for c in d["choices"]]
        res = loglikelihoods(model, tokenizer, reqs, batch_size, progress, desc=task)
        per_doc = {m: [] for m in ACC_METRICS}
        k = 0
        for d in docs:
            lls = [ll for ll, _ in res[k:k + len(d["choices"])]]
            k += len(d["choices"])
            for m, v in multiple_choice_scores(lls, d["choices"], d["gold"]).items():
                per_doc[m].append(v)
        metrics = {m: sum(v) / len(docs) for m, v in per_doc.items()}
        stderr = {m: mean_stderr(v) for m, v in per_doc.items()}
    return TaskResult(task=task, metrics=metrics, stderr=stderr, per_doc=per_doc, n=len(docs),
                      seconds=time.perf_counter() - t0, doc_ids=[int(d.get("index", i)) for i, d in enumerate(docs)])


# ------------------------------------------------------------------------------- lm-eval harness

def _from_lm_eval(task: str, out: dict, seconds: float) -> TaskResult:
    res = out["results"][task]
    metrics, stderr = {}, {}
    for key, value in res.items():
        name, comma, _filter = key.partition(",")  # "acc,none"; skips "alias", "sample_len"
        if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        metrics[name] = float(value)
        se = res.get(f"{name}_stderr,{_filter}")
        stderr[name] = float(se) if isinstance(se, (int, float)) else float("nan")
    per_doc: Dict[str, List[float]] = {}
    doc_ids: List[int] = []
    samples = sorted((out.get("samples") or {}).get(task, []), key=lambda s: s.get("doc_id", 0))
    if samples:
        doc_ids = [int(s.get("doc_id", i)) for i, s in enumerate(samples)]
        for name in metrics:
            vals = [s.get(name) for s in samples]
            if all(isinstance(v, (int, float)) and v in (0, 1) for v in vals):
                per_doc[name] = [float(v) for v in vals]
    n_info = (out.get("n-samples") or {}).get(task, {})
    n = int(n_info.get("effective", len(samples)))
    return TaskResult(task=task, metrics=metrics, stderr=stderr, per_doc=per_doc, n=n, seconds=seconds,
                      doc_ids=doc_ids)


def score_lm_eval(model, tokenizer, tasks: List[str], limit: Optional[int], batch_size: int = 8) -> Dict[str, TaskResult]:
    """Score tasks with lm-evaluation-harness itself (its own datasets: needs hub access or its cache).
    lm-eval's ``limit`` takes the first docs, not a random subset."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise QuantfixError(f"task {tasks[0]} is not a local task ({', '.join(LOCAL_TASKS)}) and lm-eval is "
                            f"not installed: pip install lm-eval") from None
    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit or None, log_samples=True)
    except Exception as e:  # lm-eval raises many types for unknown tasks / missing datasets
        raise QuantfixError(f"lm-eval could not run {', '.join(tasks)}: {type(e).__name__}: {e}") from e
    seconds = (time.perf_counter() - t0) / max(len(tasks), 1)
    return {t: _from_lm_eval(t, out, seconds) for t in tasks if t in out.get("results", {})}


def score_tasks(model, tokenizer, tasks: List[str], data_dir: str, cfg: EvalConfig,
                progress: bool = True) -> Dict[str, TaskResult]:
    """Every task of ``tasks`` scored on ``model``: local tasks (``LOCAL_TASKS``) from ``data_dir``
    (or ``cfg.task_paths``) on a seeded subset of ``cfg.task_limit`` documents, others through lm-eval."""
    results: Dict[str, TaskResult] = {}
    remote = [t for t in tasks if t not in LOCAL_TASKS]
    if remote:  # fail before spending time on the local ones
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise QuantfixError(f"task {remote[0]} is not a local task ({', '.join(LOCAL_TASKS)}) and lm-eval is "
                                f"not installed: pip install lm-eval") from None
    paths = dict(cfg.task_paths)
    for task in tasks:
        if task in LOCAL_TASKS:
            docs = load_docs(task, data_dir, limit=cfg.task_limit, seed=cfg.task_seed, paths=paths)
            results[task] = score_task(model, tokenizer, task, docs, batch_size=cfg.task_batch_size, progress=progress)
            log.info("%s: %s (n=%d, %.1fs)", task, {k: round(v, 4) for k, v in results[task].metrics.items()},
                     results[task].n, results[task].seconds)
    if remote:
        results.update(score_lm_eval(model, tokenizer, remote, cfg.task_limit, cfg.task_batch_size))
    return {t: results[t] for t in tasks if t in results}


def cached_baseline(model, tokenizer, cfg: EvalConfig, data_dir: str, cache: Path, key: list) -> Dict[str, TaskResult]:
    """The float model's task results on ``cfg.tasks``, cached in ``cache`` per task, keyed by
    ``key`` (the model's content fingerprint and dtype), the task's subset and its data file."""
    out, todo = {}, []
    for t in cfg.tasks:
        path = cache / f"{_baseline_key(t, cfg, data_dir, key)}.json"
        cached = load_entry(path, lambda b: TaskResult.from_dict(json.loads(b)))
        if cached is not None:
            out[t] = cached
        else:
            todo.append((t, path))
    if todo:
        fresh = score_tasks(model, tokenizer, [t for t, _ in todo], data_dir, cfg)
        for t, path in todo:
            atomic_write(path, lambda tmp, r=fresh[t]: tmp.write_text(json.dumps(r.to_dict(per_doc=True))))
            out[t] = fresh[t]
    return out


def _baseline_key(task: str, cfg: EvalConfig, data_dir: str, key: list) -> str:
    """A float task result's key: ``key``, the task's subset and its data file's content."""
    f = task_path(task, data_dir, dict(cfg.task_paths)) if task in LOCAL_TASKS else None
    data = file_digest(f) if f is not None and f.is_file() else str(dict(cfg.task_paths).get(task))
    return digest([f"tasks-v{CACHE_VERSION}", *key, task, cfg.task_limit, cfg.task_seed, data])[:16]


# --------------------------------------------------------------------------------------- compare

def _paired(base: TaskResult, quant: TaskResult, metric: str) -> Optional[List[float]]:
    b, q = base.per_doc.get(metric), quant.per_doc.get(metric)
    if not b or not q or len(b) != len(q) or len(b) < 2:
        return None
    if base.doc_ids and quant.doc_ids and base.doc_ids != quant.doc_ids:
        return None
    return [x - y for x, y in zip(b, q)]


def compare(base: TaskResult, quant: TaskResult, metric: str, max_drop_points: float, z: float = 1.96) -> dict:
    """Noise-aware check of quant against base on one metric.

    Accuracies are in points (x100). The drop's standard error is paired (std of the per-doc
    differences / sqrt(n)) when both results scored the same docs, else unpaired
    sqrt(se_b^2 + se_q^2). Fails only if the drop exceeds max_drop_points AND z standard errors.
    For perplexity (lower is better) the drop is the increase, in perplexity units."""
    for r, name in ((base, "base"), (quant, "quant")):
        if metric not in r.metrics:
            raise QuantfixError(f"{name} result of {r.task} has no metric {metric!r} (has {', '.join(r.metrics)})")
    lower = metric in LOWER_IS_BETTER
    scale = 1.0 if lower else 100.0
    b, q = base.metrics[metric] * scale, quant.metrics[metric] * scale
    bad = [f"{name} {metric} is {v} (non-finite)" for name, v in (("float", b), ("quantized", q)) if not math.isfinite(v)]
    if bad:  # a NaN compares false with every limit: fail it explicitly
        return {"metric": metric, "base": b, "quant": q, "delta": q - b, "stderr": float("nan"),
                "max_drop": max_drop_points, "within_noise": False, "failed": True, "reason": "; ".join(bad)}
    drop = (q - b) if lower else (b - q)
    diffs = None if lower else _paired(base, quant, metric)
    if diffs is not None:
        se, kind = mean_stderr(diffs) * scale, "paired"
    else:
        se = math.sqrt(base.stderr.get(metric, 0.0) ** 2 + quant.stderr.get(metric, 0.0) ** 2) * scale
        kind = "unpaired"
    within_noise = drop <= z * se
    failed = drop > max_drop_points and not within_noise
    unit = "" if lower else " pts"
    if failed:
        reason = (f"{metric} dropped {drop:.2f}{unit} > max {max_drop_points:g}{unit} and > {z:g} x {kind} "
                  f"stderr {se:.2f}")
    elif drop > max_drop_points:
        reason = f"{metric} dropped {drop:.2f}{unit} > max {max_drop_points:g}{unit} but within noise ({z:g} x {kind} stderr {se:.2f})"
    else:
        reason = f"{metric} drop {drop:.2f}{unit} <= max {max_drop_points:g}{unit}"
    return {"metric": metric, "base": b, "quant": q, "delta": q - b, "stderr": se, "max_drop": max_drop_points,
            "within_noise": within_noise, "failed": failed, "reason": reason}
