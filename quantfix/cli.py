"""The command line before Hydra takes over: every override is composed and the config validated
first, so that a mistyped key, a wrong type or value, an impossible setting or an unwritable run
dir is one line naming the key and the fix (exit 2) instead of Hydra's traceback-like message
(exit 1, the code of "thresholds not met") or a log file that cannot be opened."""
from __future__ import annotations

import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import List, Optional

CONF = Path(__file__).resolve().parent.parent / "conf"
# Hydra's own flags: they print something (help, config, info) or pick another config; let Hydra do them
HYDRA_FLAGS = ("-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "-p", "--package", "--resolve",
               "-sc", "--shell-completion", "--version", "-cp", "--config-path", "-cn", "--config-name", "-cd",
               "--config-dir", "--experimental-rerun")
MULTIRUN = ("-m", "--multirun")


def preflight(argv: List[str]) -> Optional[str]:
    """The first problem with the command line ``argv`` (without the program name) as one line, or
    None (also when Hydra's own flags ask for help or another config: Hydra answers those). In a
    sweep (-m) only keys, types, choices and the sweep dir are checked here: a job whose values
    ``validate`` refuses fails alone, and the others run."""
    if any(a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return None
    multirun = any(a in MULTIRUN for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        combos = _combinations(overrides)
    except Exception as e:  # the override grammar's parse error
        return _parse_problem(overrides, e)
    for combo in combos:
        problem = _compose_problem(combo, multirun)
        if problem:
            return problem
    return None


def _combinations(overrides: List[str]) -> List[List[str]]:
    """One override list per value of every sweep (``quant=rtn,gptq``): the first values of all
    sweeps, then each other value on its own; plain overrides everywhere."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer

    parsed = OverridesParser.create().parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [(o, [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
              if hasattr(o, "sweep_string_iterator") else
              (o, [f"{o.get_key_element()}={Transformer.encode(v)}" for v in o.sweep_iterator()])
              for o in parsed if o.is_sweep_override()]
    if not sweeps:
        return [plain]
    first = [vals[0] for _, vals in sweeps if vals]
    out = [plain + first]
    for i, (_, vals) in enumerate(sweeps):
        for v in vals[1:]:
            out.append(plain + first[:i] + [v] + first[i + 1:])
    return list(itertools.islice(out, 64))


def _parse_problem(overrides: List[str], e: Exception) -> str:
    bad = next((o for o in overrides if _unparsable(o)), overrides[0] if overrides else "")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"override {bad!r} is not valid override syntax ({first}): write key=value, lists as key=[a,b]"


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
        return False
    except Exception:  # noqa: BLE001 - any parse error
        return True


def _compose_problem(overrides: List[str], multirun: bool) -> Optional[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfix.config import register, validate
    from quantfix.errors import QuantfixError

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types
        return compose_message(e)
    finally:
        GlobalHydra.instance().clear()
    problem = _unknown_top_level(cfg)
    if problem:
        return problem
    if not multirun:  # in a sweep, a job whose values are refused fails alone and the others run
        try:
            validate(cfg)
        except QuantfixError as e:
            return str(e)
    return _run_dir_problem(cfg, multirun)


def compose_message(e: Exception) -> str:
    """One line for a composition error: the key, what is wrong with it, and the fix."""
    chain, x = [], e
    while x is not None:
        chain.append(x)
        x = x.__cause__ or x.__context__ if x.__cause__ is not x else None
    text = "\n".join(str(c) for c in chain)
    key = re.search(r"full_key: (\S+)", text)
    key = key.group(1) if key else None
    m = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if m:
        return (f"{key or m.group(1)} is not a config key ({m.group(2)} has no {m.group(1)!r}): check the spelling; "
                "python -m quantfix --help lists the groups, --cfg job every key")
    m = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", text)
    if m:
        return f"{key}={m.group(1)}: choose one of {m.group(2)}"
    m = re.search(r"Value '([^']*)' of type '(\w+)' could not be converted to (\w+)", text)
    if m:
        return f"{key}={m.group(1)}: expected {_article(m.group(3).lower())}"
    m = re.search(r"Could not find '([^'/]+)/([^']+)'.*?Available options in '[^']+':\s*((?:\s*\S+\n?)*)", text, re.S)
    if m:
        options = ", ".join(o.strip() for o in m.group(3).split("\n") if o.strip() and ":" not in o)
        return f"{m.group(1)}={m.group(2)}: no such option; choose one of {options.split(', Config')[0]}"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"the config does not compose: {first}"


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _unknown_top_level(cfg) -> Optional[str]:
    from dataclasses import fields

    from quantfix.config import Config

    known = {f.name for f in fields(Config)} | {"hydra"}
    extra = [k for k in cfg.keys() if k not in known]
    if extra:
        return (f"{extra[0]} is not a config key: check the spelling (python -m quantfix --help lists the groups, "
                "--cfg job every key)")
    return None


def _run_dir_problem(cfg, multirun: bool) -> Optional[str]:
    """The run dir Hydra will log into (and output_dir) must be writable, or creatable."""
    try:
        run_dir = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: Hydra checks it
        return None
    for key, d in (("hydra.sweep.dir" if multirun else "hydra.run.dir", run_dir), ("output_dir", cfg.output_dir)):
        if d and not _creatable(Path(d)):
            return (f"{key}={d} is not writable (the run's logs and results go there): pick a writable "
                    f"{key}=<dir>")
    return None


def _creatable(path: Path) -> bool:
    """Whether ``path`` is a writable directory or could be made one (its nearest existing parent is)."""
    p = path.expanduser().absolute()
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        return False
    try:  # root passes access(); an immutable folder or a read-only mount refuses the write itself
        fd, name = tempfile.mkstemp(dir=p, prefix=".quantfix-write-test-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True
