"""Quantizer math against references: compressed-tensors for RTN, algebra for GPTQ and AWQ."""
import pytest
import torch

from quantfix.quantize import fake


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_compressed_tensors(bits, group, sym):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(bits * 10 + group)
    W = torch.randn(48, 128) * 0.05 + 0.01
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group else "channel",
                            group_size=group or None)
    if group:
        Wg = W.reshape(48, 128 // group, group)
        mn, mx = Wg.amin(-1), Wg.amax(-1)
    else:
        mn, mx = W.amin(-1, keepdim=True), W.amax(-1, keepdim=True)
    s, z = calculate_qparams(mn, mx, args)
    ref = fake_quantize(W, s, z, args)
    assert torch.equal(fake.rtn(W, bits, group, sym), ref)


def test_rtn_levels_and_error_shrink_with_bits():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    q4 = fake.rtn(W, 4, 32, True)
    # at most 16 distinct levels per group
    assert all(q4[r, :32].unique().numel() <= 16 for r in range(32))
    errs = [float((fake.rtn(W, b, 32, True) - W).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]


def _correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ A


def test_gptq_with_identity_hessian_is_rtn():
    torch.manual_seed(1)
    W = torch.randn(16, 64)
    H = torch.eye(64)  # no correlation: nothing to compensate
    assert torch.allclose(fake.gptq(W, H, 4, 32, True, opts=fake.GPTQOptions(damp=0.0)), fake.rtn(W, 4, 32, True), atol=1e-6)


def test_gptq_beats_rtn_on_output_error():
    torch.manual_seed(2)
    X = _correlated_inputs()
    H = X.T @ X
    W = torch.randn(32, 64)
    e_rtn = fake.output_error(W, fake.rtn(W, 3, 32, True), H)
    e_gptq = fake.output_error(W, fake.gptq(W, H, 3, 32, True), H)
    direct = float(((W - fake.gptq(W, H, 3, 32, True)) @ X.T).pow(2).sum())
    assert e_gptq == pytest.approx(direct, rel=1e-3)  # output_error is ||dW X^T||^2
    assert e_gptq < 0.8 * e_rtn


def test_awq_protects_an_outlier_channel():
    torch.manual_seed(3)
    X = torch.randn(4096, 64)
    X[:, 5] *= 40  # one input channel with massive activations
    H = X.T @ X
    W = torch.randn(32, 64) * 0.05
    alpha, s = fake.awq_search([W], H, X.abs().mean(0), 4, 32, True, grid=20)
    e_rtn = fake.output_error(W, fake.rtn(W, 4, 32, True), H)
    e_awq = fake.output_error(W, fake.awq(W, s, 4, 32, True), H)
    assert alpha > 0 and e_awq < 0.7 * e_rtn
    assert s[5] == s.max()  # the outlier channel gets the largest scale


def test_nf4_uses_sixteen_levels_per_block():
    torch.manual_seed(4)
    W = torch.randn(8, 64)
    q = fake.nf4(W, 64)
    for r in range(8):
        levels = (q[r] / W[r].abs().max()).unique()
        assert levels.numel() <= 16
        assert torch.isin(levels.round(decimals=5), fake.NF4_LEVELS.round(decimals=5)).all()


def test_llm_int8_keeps_outlier_columns():
    torch.manual_seed(5)
    W = torch.randn(8, 32)
    q = fake.llm_int8_weight(W, torch.tensor([3, 7]))
    assert torch.equal(q[:, [3, 7]], W[:, [3, 7]])
    assert not torch.equal(q[:, 0], W[:, 0])
