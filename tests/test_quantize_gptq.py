"""GPTQ at several precisions in one sweep (quantize/gptq.py) equals llm-compressor's own sweep run
once per precision, bit for bit, and the bank simulates a module's GPTQ options of one input in one
call whichever of them a plan asks for."""
import pytest
import torch

from quantfix.quantize import algorithms, gptq, scales
from quantfix.quantize.algorithms import Precision

OPTIONS = [(2, 64, False), (3, 64, False), (3, 32, False), (3, 48, False), (4, 64, True), (4, 32, True), (4, 0, True),
           (5, 64, True), (6, 64, True), (8, 0, True)]


def _problem(rows=48, cols=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    X = torch.randn(600, cols, generator=g) * torch.linspace(0.05, 3, cols)
    X[:, 7] *= 40  # an outlier channel
    H = X.T @ X
    H[:, 11] = 0
    H[11, :] = 0  # a dead column
    return W, H


@pytest.mark.parametrize("loop", ["scripted", "python"])
def test_one_sweep_equals_the_engines_sweep_per_precision(loop, monkeypatch):
    if loop == "python":  # the loop TorchScript's absence leaves: the same bits
        monkeypatch.setattr(gptq, "_SCRIPTED", [gptq._columns])
    else:
        assert isinstance(gptq._script(), torch.jit.ScriptFunction)  # this torch compiles it
    W, H = _problem()
    qs, ref = [], []
    for bits, g, sym in OPTIONS:
        s, z = scales.search_qparams(W, bits, g, sym, "minmax")
        qs.append(gptq.Quantizer(bits, g, sym, s.float(), z.float()))
        ref.append(algorithms._gptq_sweep(W, H, Precision(bits, g, sym, "gptq"), s.float(), z.float(), 0.01, 64))
    out = gptq.sweep(W, H, qs, 0.01, 64)
    for o, r, opt in zip(out, ref, OPTIONS):
        assert torch.equal(o, r), opt


def test_a_precisions_result_does_not_depend_on_what_is_swept_with_it():
    W, H = _problem(seed=1)
    s, z = scales.search_qparams(W, 3, 64, False, "minmax")
    q = gptq.Quantizer(3, 64, False, s.float(), z.float())
    s2, z2 = scales.search_qparams(W, 5, 64, True, "minmax")
    other = gptq.Quantizer(5, 64, True, s2.float(), z2.float())
    assert torch.equal(gptq.sweep(W, H, [q])[0], gptq.sweep(W, H, [other, q, other])[1])


def test_gptq_options_on_the_cpu_match_the_per_precision_path():
    from quantfix.quantize.algorithms import SimInputs
    from quantfix.quantize.stats import InputStats

    W, H = _problem(seed=2)
    stats = InputStats(H, torch.ones(W.shape[1]), torch.ones(W.shape[1]), 600)
    ps = [Precision(3, 64, False, "gptq_imatrix"), Precision(4, 32, True, "gptq"), Precision(4, 64, True, "gptq_mse")]
    inputs = {p: [SimInputs(stats=stats, qparams_cache={})] for p in ps}
    got = algorithms.gptq_options([W], ps, inputs)
    for p in ps:
        alone = algorithms.get(p.algorithm).simulate_many([W], p, [SimInputs(stats=stats, qparams_cache={})])[0]
        assert torch.equal(got[p][0], alone), p


def test_factorize_leaves_the_hessian_and_weight_it_reads_as_they_were():
    W, H = _problem(seed=9)  # with a dead column: factorize zeroes it in its own permuted copy
    W0, H0 = W.clone(), H.clone()
    perm, Wp, _ = gptq.factorize(H, W, 0.01)
    assert torch.equal(H, H0) and torch.equal(W, W0)
    assert torch.equal(Wp, torch.where(torch.diagonal(H0)[perm] == 0, 0.0, W0[:, perm]))
