"""The diagnosis journaled in the run dir (``diagnosis_full*.json``), so that ``loop.resume=true``
replays it after an interruption: written atomically with the run's fingerprint, read back only
by a run with the same fingerprint."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Tuple

from quantfix.cache import atomic_write
from quantfix.diagnose.findings import Diagnosis

log = logging.getLogger(__name__)


def save(path: Path, diag: Diagnosis, fingerprint: str) -> None:
    body = dict(diag.to_dict(), fingerprint=fingerprint)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(body, default=str)), checksum=False,
                 setting="hydra.run.dir")


def load(path: Path, fingerprint: str) -> Tuple[Optional[Diagnosis], Optional[str]]:
    """(the diagnosis journaled at ``path`` by an interrupted run with this fingerprint, or None;
    the warning the report must carry when one was there but written by another run)."""
    if not path.exists():
        return None, None
    try:
        d = json.loads(path.read_text())
    except ValueError as e:  # written atomically, but it may have been damaged since
        log.warning("resume: %s is unreadable (%s): diagnosing again", path, e)
        return None, None
    if d.pop("fingerprint", None) != fingerprint:
        return None, (f"resume: {path.name} was written by another run (model, data, thresholds, config or code "
                      "differ): ignored, diagnosing again")
    log.info("resume: diagnosis loaded from %s", path)
    return Diagnosis.from_dict(d), None
