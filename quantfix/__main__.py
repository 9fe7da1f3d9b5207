"""``python -m quantfix``: the Hydra entry point."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from quantfix.config import register
from quantfix.errors import QuantfixError

log = logging.getLogger("quantfix")
register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _main(cfg: DictConfig) -> float:
    from quantfix.loop import run

    out_dir = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        report = run(cfg, out_dir)
    except QuantfixError as e:
        print(f"quantfix: error: {e}", file=sys.stderr)
        log.error("%s", e)
        sys.exit(2)
    fin = report.get("final") or {}
    # the return value is what a Hydra sweeper optimizes: the final average bits (inf if failed)
    return float(fin.get("avg_bits", 0.0)) if fin.get("passed", True) else float("inf")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
