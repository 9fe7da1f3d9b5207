"""An existing quantized checkpoint as plan 0 (``quantized.name_or_path``), decided in one place.

Read once against its float parent (any format ``formats`` reads), it supplies plan 0 (every
module's scheme as the checkpoint stores it, in a ``ckpt`` / ``ckpt_approx`` precision), the
weights of the modules a repair keeps (the bank serves them), what the report says of it, and for
a GGUF file the repair as llama.cpp ``llama-quantize --tensor-type`` overrides.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import List, Optional

from quantfix import formats
from quantfix.formats.common import External
from quantfix.plan import Plan
from quantfix.runreport import ExistingInfo

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ExistingCheckpoint:
    path: str
    ext: External
    plan0: Plan  # the checkpoint's own scheme, its provenance as the plan's calibration
    info: ExistingInfo
    warnings: List[str]

    @classmethod
    def read(cls, path: str, template: Plan, model) -> "ExistingCheckpoint":
        """The checkpoint at ``path`` read against ``model`` (its float parent), whose planned
        modules ``template`` (plan 0 from ``quant``) lists."""
        ext = formats.read(path, template, model)
        kinds = [p.alg for p in ext.plan.modules.values() if not p.is_float]
        approx = sum(1 for a in kinds if a.rerounded_at_export)
        info = ExistingInfo(path, ext.format, ext.summary(), list(ext.notes), sum(1 for a in kinds if a.external) - approx,
                            approx)
        log.info("existing checkpoint: %s", ext.summary())
        warnings = []
        if approx:
            warnings.append(f"{approx} modules of {path} use a grid compressed-tensors cannot store exactly ({ext.format}: "
                            "a float minimum or non-uniform levels): the diagnosis measures them as downloaded; the "
                            "repair's trials measure the ones a plan keeps re-rounded to the nearest integer grid, as "
                            "the export writes them")
        plan0 = dataclasses.replace(ext.plan, calibration={"checkpoint": path, "format": ext.format})
        return cls(path, ext, plan0, info, warnings)

    def serve(self, bank) -> None:
        """Hand the checkpoint's dequantized weights (and their integer grids) to the bank."""
        bank.use_external(self.ext.weights, self.ext.qparams)

    def reround_for_trials(self, bank, plan0: Plan) -> int:
        """From now on the bank serves the approximate-grid modules (NF4, ...) that ``plan0`` keeps
        as the export writes them, re-rounded to their integer grid: a plan is judged on what ships.
        Returns the modules changed (a second call changes none)."""
        changed = bank.reround_external(plan0)
        if changed:
            self.info.modules_rerounded_for_trials = len(changed)
            log.info("%d approximate-grid checkpoint modules: trials measure them re-rounded to the grid the export "
                     "writes", len(changed))
        return len(changed)

    def write_overrides(self, plan: Plan, out_dir: Path, parent: str) -> Optional[Path]:
        """For a GGUF checkpoint, the repair in llama.cpp's own toolchain (``llama_quantize_overrides.txt``)."""
        if self.ext.format != "gguf":
            return None
        from quantfix.formats import gguf_io

        return gguf_io.write_overrides(plan, self.ext, out_dir, self.path, parent)
