"""The Plan: one precision per module. The planner emits it, the quantizers consume it, the report
prints it and the export writes it (``plan.yaml``) as the recipe that reproduces the checkpoint."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import yaml

from quantfix.errors import QuantfixError
from quantfix.quantize import algorithms
from quantfix.quantize.algorithms import FLOAT_BITS, Precision


def valid_group_size(requested: int, in_features: int, strict: bool, name: str) -> Tuple[int, Optional[str]]:
    """The group size to use for a module: requested if it divides in_features, else the nearest
    divisor that is a multiple of 8 (packing), with a warning; with strict, an error."""
    if requested == 0 or in_features % requested == 0:
        return requested, None
    options = [d for d in range(8, in_features + 1, 8) if in_features % d == 0] or [in_features]
    if strict:
        common = ", ".join(str(d) for d in options if d in (32, 64, 128, 192, 256) or d == in_features)
        raise QuantfixError(
            f"quant.group_size={requested} does not divide in_features={in_features} of {name}: use one of "
            f"{common}, or set quant.strict=false to pick the nearest valid size per module"
        )
    best = min(options, key=lambda d: (abs(d - requested), d))
    return best, f"group_size {requested} does not divide in_features={in_features} of {name}: using {best}"


@dataclass
class Plan:
    """modules: name -> Precision; shapes: name -> (out_features, in_features).
    other_params counts the parameters not in ``modules`` (embeddings, norms), stored as float."""

    modules: Dict[str, Precision]
    shapes: Dict[str, Tuple[int, int]]
    other_params: int = 0
    calibration: Dict[str, object] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self):
        missing = set(self.modules) - set(self.shapes)
        if missing:
            raise QuantfixError(f"plan names modules with no shape: {sorted(missing)[:3]}")
        if len(self.families()) > 1:
            raise QuantfixError("a plan cannot mix bitsandbytes (llm_int8, nf4) and compressed-tensors (rtn, gptq, "
                                "awq, ...) modules in one checkpoint: pick one family")
        algs = {p.algorithm for p in self.modules.values() if not p.is_float}
        fixed = [a for a in algs if not algorithms.get(a).mixable]
        if fixed and len(algs) > 1:
            raise QuantfixError(f"{fixed[0]} applies to the whole plan and cannot be mixed with {sorted(algs - {fixed[0]})}"
                                " in one checkpoint")

    # ---- size -------------------------------------------------------------------------------
    def module_bits(self, name: str) -> float:
        out_f, in_f = self.shapes[name]
        return self.modules[name].bits_per_weight(in_f) * out_f * in_f

    @property
    def n_params(self) -> int:
        return sum(o * i for o, i in self.shapes.values())

    @property
    def avg_bits(self) -> float:
        """Average storage bits per weight over the planned modules."""
        return sum(self.module_bits(n) for n in self.modules) / max(1, self.n_params)

    @property
    def size_bytes(self) -> int:
        """Whole-model size: planned modules at their precision, everything else at 16 bits."""
        return int((sum(self.module_bits(n) for n in self.modules) + FLOAT_BITS * self.other_params) / 8)

    @property
    def avg_bits_model(self) -> float:
        return 8 * self.size_bytes / max(1, self.n_params + self.other_params)

    # ---- views ------------------------------------------------------------------------------
    def summary(self) -> Dict[str, int]:
        return dict(sorted(Counter(p.label for p in self.modules.values()).items()))

    def summary_str(self) -> str:
        """Every precision with its module count: "W4g64-gptq-imx x67, W8ch x12, FP16 x1"."""
        return ", ".join(f"{k} x{v}" for k, v in self.summary().items())

    def widths_str(self) -> str:
        """The storage widths alone (the algorithm left out): "W4g32 x45, W5g64 x79"."""
        c = Counter("FP16" if p.is_float else p.label.split("-")[0] for p in self.modules.values())
        return ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))

    def rounding_str(self) -> str:
        """The algorithms of the quantized modules: "gptq_imatrix 160, imatrix 40"."""
        c = Counter(p.algorithm for p in self.modules.values() if not p.is_float)
        return ", ".join(f"{k} {v}" for k, v in c.most_common())

    def families(self) -> set:
        """The checkpoint formats the quantized modules need (a plan must fit in one)."""
        return {p.family for p in self.modules.values() if not p.is_float}

    def reads_calibration(self) -> bool:
        """Whether a quantized module's rounding reads the calibration data (its weights change when the
        data does)."""
        return any(p.alg.calibrated for p in self.modules.values() if not p.is_float)

    def algorithm(self) -> str:
        algs = Counter(p.algorithm for p in self.modules.values() if not p.is_float)
        return algs.most_common(1)[0][0] if algs else "none"

    def with_changes(self, changes: Dict[str, Precision], note: str = "") -> "Plan":
        modules = dict(self.modules)
        modules.update(changes)
        return replace(self, modules=modules, note=note)

    def diff(self, other: "Plan") -> Dict[str, Tuple[str, str]]:
        return {n: (self.modules[n].label, other.modules[n].label)
                for n in self.modules if other.modules.get(n) != self.modules[n]}

    # ---- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "avg_bits": round(self.avg_bits, 4),
            "size_bytes": self.size_bytes,
            "summary": self.summary(),
            "calibration": dict(self.calibration),
            "other_params": self.other_params,
            "note": self.note,
            "modules": {n: {**asdict(p), "shape": list(self.shapes[n])} for n, p in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        try:
            modules, shapes = {}, {}
            for name, spec in d["modules"].items():
                spec = dict(spec)
                shapes[name] = tuple(spec.pop("shape"))
                modules[name] = Precision(**spec)
            return cls(modules=modules, shapes=shapes, other_params=int(d.get("other_params", 0)),
                       calibration=dict(d.get("calibration") or {}), note=d.get("note", ""))
        except (KeyError, TypeError) as e:
            raise QuantfixError(f"malformed plan: {e}; a plan has 'modules' with bits, group_size, symmetric, "
                                "algorithm and shape per module") from e

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text()))
        except FileNotFoundError as e:
            raise QuantfixError(f"plan file not found: {path}") from e


from quantfix.arch import layer_index, module_role, module_type  # noqa: E402,F401 - part of this module's API
