"""The per-algorithm registry: every entry simulates, sizes, labels and exports consistently."""
import pytest
import torch

from quantfix.config import QuantConfig
from quantfix.plan import Precision
from quantfix.quantize import algorithms
from quantfix.quantize.calib import InputStats


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, 3] *= 20  # an outlier channel
    stats = InputStats(hessian=x.T @ x, absmax=x.abs().amax(0), absmean=x.abs().mean(0), n_tokens=256)
    return stats, algorithms.SimInputs(stats=stats, awq_scales=lambda: stats.absmean.clamp(min=1e-5) ** 0.5)


@pytest.mark.parametrize("name", algorithms.NAMES)
def test_every_algorithm_simulates_sizes_and_exports(name):
    alg = algorithms.get(name)
    bits = alg.bits[-1]
    group = alg.fixed_group(32) if alg.fixed_group else 32
    p = Precision(bits, group, True, name)
    W = torch.randn(48, 64) * 0.05
    _, inputs = _inputs()
    Q = alg.simulate(W, p, inputs)
    assert Q.shape == W.shape and torch.isfinite(Q).all()
    assert 0 < (Q - W).abs().max() < W.abs().max()  # quantized, not zeroed
    assert p.bits_per_weight(64) > bits and p.label and p.label != "FP16"
    assert alg.check_bits(bits) is None and alg.check_bits(1) is not None
    if alg.family == algorithms.COMPRESSED_TENSORS:
        assert alg.modifiers is not None and alg.bnb_config is None
    else:
        assert alg.bnb_config is not None and alg.modifiers is None
        assert alg.bnb_config(["lm_head"], torch.float32, QuantConfig()) is not None


def test_calibrated_algorithms_use_the_statistics():
    stats, inputs = _inputs()
    W = torch.randn(48, 64) * 0.05
    H = stats.hessian
    err = {n: algorithms.fake.output_error(W, algorithms.get(n).simulate(W, Precision(3, 32, True, n), inputs), H)
           for n in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"]
    # without statistics GPTQ falls back to RTN
    no_stats = algorithms.SimInputs()
    assert torch.equal(algorithms.get("gptq").simulate(W, Precision(3, 32, True, "gptq"), no_stats),
                       algorithms.get("rtn").simulate(W, Precision(3, 32, True, "rtn"), no_stats))


def test_bits_rule_is_one_place():
    assert algorithms.bits_problem(4) is None and algorithms.bits_problem(16) is not None
    assert algorithms.bits_problem(16, allow_float=True) is None
    assert "out of range" in algorithms.bits_problem(9)
    with pytest.raises(Exception, match="out of range"):
        Precision(9)
