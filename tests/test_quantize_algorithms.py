"""The per-algorithm registry (``quantfix.quantize.algorithms``): every entry simulates, sizes, labels
and exports consistently."""
import pytest
import torch

from quantfix.config import QuantConfig
from quantfix.plan import Precision
from quantfix.quantize import algorithms
from quantfix.calib import InputStats


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, 3] *= 20  # an outlier channel
    stats = InputStats(hessian=x.T @ x, absmax=x.abs().amax(0), absmean=x.abs().mean(0), n_tokens=256)
    return stats, algorithms.SimInputs(stats=stats, awq_scales=lambda: stats.absmean.clamp(min=1e-5) ** 0.5)


# llama.cpp's types simulate with ggml's own quantizer (the built tools) and export through
# llama-quantize: tests/test_quantize_gguf.py checks each of them bit for bit
PER_MODULE = tuple(n for n in algorithms.NAMES if algorithms.get(n).per_module and not algorithms.get(n).external
                   and not algorithms.get(n).llama_cpp)


def test_whole_plan_algorithms_refuse_a_per_module_simulation():
    W = torch.randn(48, 64) * 0.05
    with pytest.raises(RuntimeError, match="loop.tune=autoround"):
        algorithms.get("autoround").simulate(W, Precision(4, 32, True, "autoround"), _inputs()[1])


@pytest.mark.parametrize("name", PER_MODULE)
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
        assert alg.observer in algorithms.OBSERVERS and alg.bnb_config is None
    else:
        assert alg.bnb_config is not None and not alg.static_export
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


def test_mse_clipping_beats_minmax_and_matches_llmcompressor():
    """mse: RTN with the clipping that llm-compressor's 'mse' weight observer searches; the
    simulation must equal what the engine computes (scales from the library observer itself)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle import fake_quantize
    from llmcompressor.observers import Observer

    torch.manual_seed(1)
    W = torch.randn(64, 128) * 0.02
    W[:, :4] *= 20  # heavy tails: min/max scales waste the grid on them
    p = Precision(4, 32, True, "mse")
    sim = algorithms.get("mse").simulate(W, p, algorithms.SimInputs())
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32, observer="mse")
    observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args)
    observer(W)
    q = observer.get_qparams()
    assert torch.equal(sim, fake_quantize(W, q["scale"], q["zero_point"], args))
    rtn = algorithms.get("rtn").simulate(W, Precision(4, 32, True, "rtn"), algorithms.SimInputs())
    assert (sim - W).pow(2).sum() < 0.9 * (rtn - W).pow(2).sum()
    assert p.label == "W4g32-mse" and p.bits_per_weight(128) == Precision(4, 32).bits_per_weight(128)


def test_simulated_gptq_equals_llmcompressors_sweep():
    """fake.gptq (CPU) and llm-compressor's quantize_weight (what the export and the CUDA simulation
    run) give the same weights, with searched scales and activation order."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from quantfix.quantize import fake, scales

    torch.manual_seed(2)
    W = torch.randn(96, 128) * 0.05
    X = torch.randn(512, 128)
    X[:, 7] *= 15
    H = X.T @ X
    for bits, group in ((4, 32), (8, 0), (3, 64)):
        s, z = scales.search_qparams(W, bits, group, True, "imatrix", importance=(X ** 2).mean(0))
        ours = fake.gptq(W, H, bits, group, True, (s, z))
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group" if group else "channel",
                                group_size=group or None, actorder="static")
        lib, _, _ = quantize_weight(W[None].clone(), H[None].clone(), s[None], z[None].to(torch.int8), None, args,
                                    blocksize=128, percdamp=0.01)
        assert torch.equal(ours, lib[0]), (bits, group)


@pytest.mark.parametrize("name", [n for n in algorithms.NAMES if algorithms.get(n).external])
def test_existing_checkpoint_precisions_do_not_simulate(name):
    """ckpt / ckpt_approx are an existing checkpoint's own weights: only the bank serves them."""
    from quantfix.errors import QuantfixError

    alg = algorithms.get(name)
    p = Precision(4, 32, True, name)
    with pytest.raises(QuantfixError, match="quantized.name_or_path"):
        alg.simulate(torch.randn(8, 64), p, algorithms.SimInputs())
    assert alg.static_export and alg.exact_export == (name == "ckpt") and p.label.startswith("W4g32-ckpt")
