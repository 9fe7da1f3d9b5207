"""``python -m quantfix``: the Hydra entry point.

Exit codes of a single run: 0 = passed (or mode=baseline / diagnose, which give no verdict),
1 = thresholds not met (report written), 2 = bad input (one ``quantfix: error:`` line),
3 = an internal error (a bug: traceback printed), 130 = interrupted. In a sweep (``-m``) a failed
or refused job does not end the process: it returns inf to the sweeper and the next job runs (an
internal error or an interrupt still ends the sweep with 3 / 130).
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from quantfix.config import register
from quantfix.errors import QuantfixError
from quantfix.logs import route_engine_logs

log = logging.getLogger("quantfix")
register()

EXIT_PASSED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _main(cfg: DictConfig) -> float:
    from quantfix.recipe import run

    hc = HydraConfig.get()
    out_dir = Path(cfg.output_dir or hc.runtime.output_dir)
    single = hc.mode == RunMode.RUN  # a sweep job must not end the sweep
    route_engine_logs(out_dir, cfg.verbose)
    try:
        report = run(cfg, out_dir)
    except QuantfixError as e:
        print(f"quantfix: error: {e}", file=sys.stderr)
        log.error("%s", e)
        print(f"run dir: {out_dir}")
        if single:
            sys.exit(EXIT_BAD_INPUT)
        return float("inf")
    except KeyboardInterrupt:
        print("quantfix: interrupted", file=sys.stderr)
        print(f"run dir: {out_dir}")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # a bug (also ends a sweep, as before): keep the traceback, say where the files are
        traceback.print_exc()
        print(f"quantfix: internal error: {type(e).__name__}: {str(e).strip()[:300]} (a bug: please report it with "
              "the traceback above)", file=sys.stderr)
        print(f"run dir: {out_dir}")
        sys.exit(EXIT_INTERNAL)
    # the run printed its run dir at the end of its summary
    if single and not report.passed:  # no verdict (mode=baseline / diagnose): nothing failed
        sys.exit(EXIT_FAILED)
    # the return value is what a Hydra sweeper optimizes: the final average bits (inf if failed)
    if not report.passed:
        return float("inf")
    return float(report.final.avg_bits) if report.final is not None else 0.0


def main() -> None:
    """The console entry: the command line checked first (one line and exit 2 for a config
    problem or an unwritable run dir), then Hydra runs the job(s)."""
    from quantfix.cli import preflight

    problem = preflight(sys.argv[1:])
    if problem:
        print(f"quantfix: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    _main()


if __name__ == "__main__":
    main()
