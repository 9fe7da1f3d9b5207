"""Every config file composes; bad values fail with one clear message naming the fix."""

import pytest
from hydra.errors import ConfigCompositionException

from quantfix.config import validate
from quantfix.errors import QuantfixError
from tests.conftest import CONF


def _options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        for f in sorted(group.glob("*.yaml")):
            yield f"{group.name}={f.stem}"


@pytest.mark.parametrize("override", list(_options()))
def test_every_config_file_composes(compose, override):
    import yaml
    from omegaconf import OmegaConf

    cfg = compose([override])
    group, name = override.split("=")
    # every value the file sets reaches the composed config (the file was selected, not the default)
    values = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    values.pop("defaults", None)  # composition, not values
    section = OmegaConf.to_container(cfg[group], resolve=False)

    def contained(want, got, where):
        for key, value in want.items():
            assert key in got, f"{where} sets {key}, which the schema lacks"
            if isinstance(value, dict):
                contained(value, got[key], f"{where}.{key}")
            elif value != "???":
                assert got[key] == value, (where, key)

    contained(values, section, f"{group}/{name}.yaml")
    if override != "model=hf":  # model=hf requires name_or_path (???)
        validate(cfg)


def test_defaults_are_the_demo(compose):
    cfg = compose()
    assert cfg.model.name_or_path == "demo" and cfg.quant.bits == 4 and cfg.quant.group_size == 64
    assert cfg.thresholds.max_ppl_increase_pct <= 5


def test_misspelled_key_fails_at_compose(compose):
    with pytest.raises(ConfigCompositionException):
        compose(["quant.bitz=4"])
    with pytest.raises(ConfigCompositionException):
        compose(["quant.bits=four"])


@pytest.mark.parametrize("override,message", [
    ("quant.algorithm=magic", "quant.algorithm=magic: choose one of rtn, mse, imatrix, gptq"),
    ("mode=fix", "mode=fix: choose one of repair, diagnose, baseline"),
    ("model.device_map=everywhere", "model.device_map=everywhere: choose one of auto, balanced"),
    ("diagnose.sensitivity.method=slow", "diagnose.sensitivity.method=slow: choose one of fast, exact, taylor, fisher"),
    ("export.formt=x", "export.formt is not a config key (ExportConfig has no 'formt')"),
    ("quant.bits=four", "quant.bits=four: expected an integer"),
    ("quant=foo", "quant=foo: no such option; choose one of awq, gptq"),
    ("+foo=1", "foo is not a config key"),
    ("loop.ladder=[4/64", "is not valid override syntax"),
])
def test_choices_and_keys_fail_when_composed_with_one_line(compose, override, message):
    """A choice-like field is an enum: a wrong value fails at compose time; the command line turns
    every composition error into one line naming the key and the fix (``cli.preflight``)."""
    from quantfix.cli import preflight

    if not override.startswith(("+", "loop.ladder", "quant=")):
        with pytest.raises(ConfigCompositionException):
            compose([override])
    problem = preflight([override])
    assert problem is not None and message in problem and "\n" not in problem, problem


@pytest.mark.parametrize("override,message", [
    ("quant.bits=9", "quant.bits=9 is out of range: use 2..8"),
    ("quant.bits=1", "quant.bits=1 is out of range"),
    ("thresholds.max_ppl_increase_pct=-1", "is impossible: use a value >= 0"),
    ("thresholds.min_top1=1.5", "thresholds.min_top1=1.5 is impossible"),
    ("thresholds.max_kld_mean=-0.1", "KL divergence is >= 0"),
    ("quant.group_size=-2", "quant.group_size=-2"),
    ("loop.ladder=[4-64]", "is not 'bits/group'"),
    ("device_memory_gb=-8", "device_memory_gb=-8.0: use 0 (the whole card)"),
])
def test_validation_messages(compose, override, message):
    with pytest.raises(QuantfixError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate(compose([override]))


def test_validation_collects_every_problem(compose):
    with pytest.raises(QuantfixError) as e:
        validate(compose(["quant.bits=9", "thresholds.min_top1=2", "eval.n_windows=0"]))
    msg = str(e.value)
    assert "quant.bits=9" in msg and "min_top1=2" in msg and "n_windows" in msg


def test_no_threshold_set_is_rejected(compose):
    cfg = compose(["thresholds.max_ppl_increase_pct=null"])
    with pytest.raises(QuantfixError, match="none set, so every plan would pass"):
        validate(cfg)
