import pytest

from quantfix.errors import QuantfixError
from quantfix.plan import Plan, Precision, valid_group_size


def _plan():
    shapes = {"m.layers.0.q_proj": (64, 128), "m.layers.0.down_proj": (128, 256)}
    modules = {"m.layers.0.q_proj": Precision(4, 32, True, "gptq"), "m.layers.0.down_proj": Precision(16)}
    return Plan(modules, shapes, other_params=1000, calibration={"domains": ["c4"]})


def test_avg_bits_and_size_by_hand():
    p = _plan()
    q_bits = 64 * 128 * (4 + 16 / 32)
    d_bits = 128 * 256 * 16
    assert p.avg_bits == pytest.approx((q_bits + d_bits) / (64 * 128 + 128 * 256))
    assert p.size_bytes == int((q_bits + d_bits + 16 * 1000) / 8)
    assert p.summary() == {"FP16": 1, "W4g32-gptq": 1}


def test_yaml_round_trip(tmp_path):
    p = _plan()
    p.save(tmp_path / "plan.yaml")
    q = Plan.load(tmp_path / "plan.yaml")
    assert q.modules == p.modules and q.shapes == p.shapes and q.other_params == p.other_params
    assert q.calibration == p.calibration and q.avg_bits == p.avg_bits


def test_asymmetric_costs_zero_points():
    assert Precision(4, 64, False).bits_per_weight(576) == pytest.approx(4 + 20 / 64)
    assert Precision(8, 0, True).bits_per_weight(576) == pytest.approx(8 + 16 / 576)


def test_group_size_nearest_divisor_and_strict():
    g, warn = valid_group_size(128, 576, strict=False, name="q")
    assert 576 % g == 0 and g % 8 == 0 and g == 144 and "does not divide" in warn
    assert valid_group_size(64, 576, False, "q") == (64, None)
    with pytest.raises(QuantfixError, match=r"does not divide in_features=576 of q: use one of 32, 64, 192, 576"):
        valid_group_size(128, 576, strict=True, name="q")


def test_bad_precisions_are_rejected():
    with pytest.raises(QuantfixError, match="out of range"):
        Precision(9, 64)
    with pytest.raises(QuantfixError, match="algorithm"):
        Precision(4, 64, True, "magic")
    shapes = {"a": (4, 8), "b": (4, 8)}
    with pytest.raises(QuantfixError, match="cannot mix bitsandbytes"):
        Plan({"a": Precision(8, 0, True, "llm_int8"), "b": Precision(4, 8, True, "gptq")}, shapes)
