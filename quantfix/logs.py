"""Where third-party engine logs go: llm-compressor and compressed-tensors log through loguru, INFO
and WARNING lines included ("No accelerator available!", one line per GPTQ module...). Unless
``verbose=true``, quantfix keeps them off the console (errors still show) and in ``<run dir>/engine.log``.

llm-compressor configures loguru when it is imported (``llmcompressor.logger.configure_logger``:
every sink removed, one added on stdout) and ``oneshot`` adds a file sink when
``LLM_COMPRESSOR_LOG_FILE`` is set; its environment variables win over any call. So the routing
is done through those variables (read at import and by every ``oneshot``), plus loguru's own
default sink for anything logged before llm-compressor is imported. A user who sets any
``LLM_COMPRESSOR_LOG_*`` variable keeps their own setting.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Optional

ENGINE_LOG = "engine.log"
_ENV_KEYS = ("LLM_COMPRESSOR_LOG_DISABLED", "LLM_COMPRESSOR_LOG_LEVEL", "LLM_COMPRESSOR_LOG_FILE",
             "LLM_COMPRESSOR_LOG_FILE_LEVEL")
_USER_ENV: Dict[str, str] = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}


def _engine_env(log_file: Path) -> Dict[str, str]:
    return {
        "LLM_COMPRESSOR_LOG_LEVEL": "ERROR",  # the console: errors only
        "LLM_COMPRESSOR_LOG_FILE": str(log_file),  # every oneshot logs here, DEBUG and up
        # configure_logger would add a second (JSON) sink on the same file: keep it to criticals so
        # the file does not hold every line twice
        "LLM_COMPRESSOR_LOG_FILE_LEVEL": "CRITICAL",
    }


def route_engine_logs(out_dir: Path, verbose: bool = False) -> Optional[Path]:
    """Send the engines' loguru lines to ``out_dir/engine.log`` (returned), or, with ``verbose`` or a
    user's own LLM_COMPRESSOR_LOG_* setting, leave them on the console (None). Called once per
    job: in a sweep that runs its jobs in one process, each job gets its own file."""
    try:
        from loguru import logger
    except ImportError:  # no engine that logs through loguru is installed
        return None
    if verbose or _USER_ENV:
        for k in _ENV_KEYS:  # undo an earlier job's routing in this process
            if k in _USER_ENV:
                os.environ[k] = _USER_ENV[k]
            else:
                os.environ.pop(k, None)
        path = None
    else:
        path = Path(out_dir) / ENGINE_LOG
        os.environ.update(_engine_env(path))
    if "llmcompressor.logger" in sys.modules:  # imported by an earlier job: re-read the variables
        from llmcompressor.logger import LoggerConfig, configure_logger

        configure_logger(LoggerConfig())
    else:  # until llm-compressor's import reconfigures loguru: compressed-tensors and the like
        logger.remove()
        if path is None:
            logger.add(sys.stderr)  # loguru's default
        else:
            logger.add(sys.stderr, level="ERROR")
            logger.add(str(path), level="INFO", delay=True)  # created on the first line only
    return path
