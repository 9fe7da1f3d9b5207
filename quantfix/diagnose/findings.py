"""The diagnosis as data: ``Finding`` (one root cause, its evidence and fix) and ``Diagnosis``
(every measurement of one plan plus its findings). Both round-trip through JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from quantfix.diagnose.sensitivity import Sensitivity


@dataclass
class Finding:
    kind: str  # concentrated_layers, spread_evenly, outlier_channels, domain_gap, ...
    finding: str  # what was seen, in words
    fix: str  # what to change
    evidence: Dict[str, Any] = field(default_factory=dict)  # the numbers behind it
    modules: List[str] = field(default_factory=list)  # the modules the fix applies to
    layers: List[int] = field(default_factory=list)  # the decoder layers it applies to
    domain: Optional[str] = None  # domain_gap: the under-served domain and its data source
    source: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"kind": self.kind}
        for key in ("modules", "layers", "domain", "source"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        d.update(finding=self.finding, evidence=self.evidence, fix=self.fix)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Finding":
        return cls(kind=d["kind"], finding=d["finding"], fix=d["fix"], evidence=d.get("evidence") or {},
                   modules=list(d.get("modules") or []), layers=[int(x) for x in d.get("layers") or []],
                   domain=d.get("domain"), source=d.get("source"))


@dataclass
class Diagnosis:
    plan_summary: str
    avg_bits: float
    metrics: Dict[str, Any]  # baseline, quantized (Metrics dicts), ppl_increase_pct
    sensitivity: Sensitivity
    outliers: List[Dict[str, Any]]  # per distinct input: float / quantized outlier summaries
    channel_errors: Dict[str, Any]  # decoder layer -> per-channel error counts
    domains: Dict[str, Any]  # domain label -> float / quantized perplexity
    generations: List[Dict[str, Any]]  # probe prompts: float vs quantized greedy text
    calibration_domains: List[str]
    plots: Dict[str, Any] = field(default_factory=dict)
    findings: List[Finding] = field(default_factory=list)
    timings_s: Dict[str, float] = field(default_factory=dict)
    memory_gb: Dict[str, Dict[str, float]] = field(default_factory=dict)  # per part: memory at its end
    eval_source: str = ""  # the deployment text of the eval windows
    # a calibrated plan measured against the same widths in plain RTN: {"kld": .., "rtn_kld": .., "algorithms": [..]}
    calibration_check: Dict[str, Any] = field(default_factory=dict)
    # MoE: per decoder layer the share of tokens whose top-k experts change when quantized, and the
    # most sensitive experts ({"layers": {layer: share}, "mean": .., "experts": [{expert, kld}, ...]})
    routing: Dict[str, Any] = field(default_factory=dict)
    # in memory only (not in diagnosis.json): what measuring the shipped checkpoint the same way needs
    # (per-domain windows and float references, float probe generations); None after a resume
    sides: Optional[Dict[str, Any]] = field(default=None, repr=False, compare=False)

    def kinds(self) -> List[str]:
        return [f.kind for f in self.findings]

    def top_layers(self, k: int = 5) -> List[int]:
        return self.sensitivity.ranked_layers()[:k]

    def to_dict(self, with_options: bool = True) -> Dict[str, Any]:
        sens = self.sensitivity.to_dict()
        if not with_options:
            sens.pop("options")
        return {"plan_summary": self.plan_summary, "avg_bits": self.avg_bits, "metrics": self.metrics,
                "sensitivity": sens, "outliers": self.outliers, "channel_errors": self.channel_errors,
                "domains": self.domains, "generations": self.generations,
                "calibration_domains": self.calibration_domains, "plots": self.plots,
                "findings": [f.to_dict() for f in self.findings], "timings_s": self.timings_s,
                "memory_gb": self.memory_gb, "eval_source": self.eval_source, "calibration_check": self.calibration_check,
                "routing": self.routing}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Diagnosis":
        return cls(plan_summary=d["plan_summary"], avg_bits=d["avg_bits"], metrics=d["metrics"],
                   sensitivity=Sensitivity.from_dict(d["sensitivity"]), outliers=d["outliers"],
                   channel_errors=d["channel_errors"], domains=d["domains"], generations=d["generations"],
                   calibration_domains=d["calibration_domains"], plots=d.get("plots") or {},
                   findings=[Finding.from_dict(f) for f in d.get("findings") or []],
                   timings_s=d.get("timings_s") or {}, memory_gb=d.get("memory_gb") or {}, eval_source=d.get("eval_source", ""),
                   calibration_check=d.get("calibration_check") or {}, routing=d.get("routing") or {})
