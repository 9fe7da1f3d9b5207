"""The config (``quantfix.config``): every config file composes; bad values fail when composed or
validated, every problem at once, each naming the fix."""

import pytest
from hydra.errors import ConfigCompositionException

from quantfix.cli import preflight
from quantfix.config import THRESHOLD_LADDER, ladder_of, parse_rung, validate
from quantfix.errors import QuantfixError
from tests.conftest import CONF, tiny_overrides


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
    ("quant.bits=9", "quant.bits=9 is out of range: use 2..8"),
    ("quant.bits=1", "quant.bits=1 is out of range"),
    ("thresholds.max_ppl_increase_pct=-1", "is impossible: use a value >= 0"),
    ("thresholds.min_top1=1.5", "thresholds.min_top1=1.5 is impossible"),
    ("thresholds.max_kld_mean=-0.1", "KL divergence is >= 0"),
    ("quant.group_size=-2", "quant.group_size=-2"),
    ("loop.ladder=[4-64]", "is not 'bits/group'"),
    ("device_memory_gb=-8", "device_memory_gb=-8.0: use 0 (the whole card)"),
    ("quant.algorithm=gguf_q4_k", "is a llama.cpp type: add export.format=gguf"),
    ("loop.refine_misses=0", "loop.refine_misses=0: use at least 1, or null to refine until converged"),
    ("loop.tune_candidates=0", "loop.tune_candidates=0: tune at least 1 plan"),
    ("loop.tune_candidates=3", "loop.tune_candidates=3 tunes budget candidates: add plan.budget.avg_bits=B"),
])
def test_validation_messages(compose, override, message):
    with pytest.raises(QuantfixError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate(compose([override]))


def test_gguf_mode_problems_all_at_once(compose):
    """GGUF mode (export.format=gguf) refuses a ladder of unknown types, bitsandbytes, the greedy
    policy and AutoRound, in one error."""
    with pytest.raises(QuantfixError) as e:
        validate(compose(["export.format=gguf", "loop.gguf_ladder=[Q4_K,Q9_K]", "quant=nf4", "loop.policy=greedy",
                          "loop.tune=autoround"]))
    msg = str(e.value)
    assert "loop.gguf_ladder entries ['Q9_K']" in msg and "bitsandbytes format" in msg
    assert "loop.policy=predictive" in msg and "leave loop.tune=none" in msg
    validate(compose(["export.format=gguf", "loop.gguf_ladder=[Q4_K,Q6_K,F16]"]))


def test_auto_format_is_gguf_for_a_gguf_file_but_not_the_demo(compose):
    """export.format=auto ships a GGUF when the model is given as a .gguf file (repair) or a GGUF
    download is the existing checkpoint, not for the demo, another existing checkpoint, other
    modes, or settings GGUF mode refuses."""
    from quantfix.config import gguf_mode

    f = "model.name_or_path=/m/x.Q4_K_M.gguf"
    assert gguf_mode(compose([f])) and gguf_mode(compose(["export.format=gguf"]))
    assert not gguf_mode(compose([])) and not gguf_mode(compose(["model.name_or_path=/m/hf_dir"]))
    for other in ("mode=diagnose", "quantized.name_or_path=/m/gptq_dir", "quant=nf4", "loop.policy=greedy",
                  "loop.tune=autoround", "export.format=checkpoint"):
        assert not gguf_mode(compose([f, other])), other
    download = ["model.name_or_path=/m/hf_dir", "quantized.name_or_path=/m/y.Q4_K_M.gguf"]
    assert gguf_mode(compose(download)) and not gguf_mode(compose(download + ["export.format=checkpoint"]))
    with pytest.raises(QuantfixError, match="only when it is a GGUF file"):
        validate(compose(["export.format=gguf", "quantized.name_or_path=/m/gptq_dir"]))


def test_validation_collects_every_problem(compose):
    with pytest.raises(QuantfixError) as e:
        validate(compose(["quant.bits=9", "thresholds.min_top1=2", "eval.n_windows=0"]))
    msg = str(e.value)
    assert "quant.bits=9" in msg and "min_top1=2" in msg and "n_windows" in msg


def test_no_threshold_set_is_rejected(compose):
    cfg = compose(["thresholds.max_ppl_increase_pct=null"])
    with pytest.raises(QuantfixError, match="none set, so every plan would pass"):
        validate(cfg)


def test_task_threshold_without_the_task_is_rejected(compose, tiny_dir, tmp_path):
    from quantfix.config import validate
    from quantfix.errors import QuantfixError

    cfg = compose(tiny_overrides(tiny_dir, tmp_path, **{"thresholds.tasks.piqa.max_drop": 2}))
    with pytest.raises(QuantfixError, match="eval.tasks does not include piqa"):
        validate(cfg)


def test_bad_device_map_or_max_memory_is_one_line(compose, tiny_dir, tmp_path):
    from quantfix.config import validate
    from quantfix.errors import QuantfixError

    with pytest.raises(ConfigCompositionException, match="model.device_map=everywhere"):
        compose(tiny_overrides(tiny_dir, tmp_path, **{"model.device_map": "everywhere"}))
    with pytest.raises(QuantfixError, match="add model.device_map=auto"):
        validate(compose(tiny_overrides(tiny_dir, tmp_path, **{"model.max_memory": "{0:10GiB}"})))
    with pytest.raises(QuantfixError, match="mapping of device to size"):
        validate(compose(tiny_overrides(tiny_dir, tmp_path, **{"model.device_map": "auto", "model.max_memory": 3})))


def test_autoround_is_not_a_per_module_option(compose, tiny_dir, tmp_path):
    with pytest.raises(QuantfixError, match="loop.tune=autoround"):
        validate(compose(tiny_overrides(tiny_dir, tmp_path, **{"loop.algorithms": "[autoround]"})))
    with pytest.raises(ConfigCompositionException):  # a choice: refused when the config is composed
        compose(tiny_overrides(tiny_dir, tmp_path, **{"loop.tune": "awq"}))
    assert preflight(["loop.tune=awq"]) == "loop.tune=awq: choose one of none, autoround"
    with pytest.raises(QuantfixError, match="quantized.name_or_path"):
        validate(compose(tiny_overrides(tiny_dir, tmp_path, **{"quant.algorithm": "ckpt"})))


def test_the_auto_ladder_follows_the_mode_and_the_tuning(compose):
    """Threshold mode climbs from plan 0 (no 2/3-bit rungs); a budget adds asymmetric 2/3-bit rungs,
    symmetric ones when AutoRound tunes the plan; a ladder given is kept as it is."""
    assert ladder_of(compose([])) == list(THRESHOLD_LADDER)
    untuned = ladder_of(compose(["plan.budget.avg_bits=3.5"]))
    tuned = ladder_of(compose(["plan.budget.avg_bits=3.5", "loop.tune=autoround"]))
    low = [parse_rung(r) for r in tuned if parse_rung(r).bits < 4]
    assert {r.bits for r in low} == {2, 3} and all(r.symmetric is True for r in low)
    assert all(parse_rung(r).symmetric is False for r in untuned if parse_rung(r).bits < 4)
    assert [r for r in tuned if parse_rung(r).bits >= 4] == [r for r in untuned if parse_rung(r).bits >= 4]
    assert ladder_of(compose([])) == ladder_of(compose(["loop.tune=autoround"]))  # threshold mode: unchanged
    assert ladder_of(compose(["plan.budget.avg_bits=3.5", "loop.tune=autoround", "loop.ladder=[3/64a,4/64,16/0]"])) \
        == ["3/64a", "4/64", "16/0"]
