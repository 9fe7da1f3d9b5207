"""Is a checkpoint a quantization of its float parent (``quantfix.formats.parent.agreement``): the
signs of the weights it keeps, blind to smoothing, far from another model's."""
import torch

from quantfix.quantize import fake


def test_agreement_is_blind_to_awq_smoothing_and_separates_another_weight():
    """AWQ checkpoints store Q(W diag(s)): far from W by relative error, yet every kept sign is W's."""
    from quantfix.formats import parent

    g = torch.Generator().manual_seed(0)
    W = torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02  # heavy-tailed like trained weights
    s = torch.exp(1.5 * torch.randn(512, generator=g))  # activation-derived scales spanning ~100x
    stored = fake.rtn(W * s, 4, 32, False)
    assert (stored - W).norm() / W.norm() > 1  # relative error cannot tell this from another model
    assert parent.agreement(stored, W) == 1.0
    x = torch.randn(2048, 512, generator=g)
    H = x.T @ x
    assert parent.agreement(fake.gptq(W, H, 2, 0, True), W) > 0.85  # GPTQ's feedback flips small weights only
    other = fake.rtn(torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02, 4, 32, False)
    assert abs(parent.agreement(other, W)) < 0.05
    assert parent.agreement(torch.zeros_like(W), W) == 0.0  # a weight zeroed whole is no quantization of W
    assert parent.agreement(W, torch.zeros_like(W)) is None  # a zero float weight: no evidence either way
