"""scales.search_qparams against llm-compressor's own weight observers (bit-exact)."""
import pytest
import torch

from quantfix.quantize import fake
from quantfix.quantize.scales import (
    importance_from_activations,
    quantize_with,
    search_qparams,
)

OUT, IN = 64, 128
CONFIGS = [  # (bits, group_size, symmetric)
    (4, 32, True),
    (4, 64, False),
    (8, 0, True),
    (3, 16, True),
    (3, 16, False),
]
DTYPES = [torch.float32, torch.bfloat16]
OBSERVER = {"minmax": "memoryless_minmax", "mse": "memoryless_mse", "imatrix": "imatrix_mse"}


def heavy_weight(seed, dtype=torch.float32, out=OUT, inp=IN):
    """Gaussian weight with a few x20 columns and a few single x8 outliers, so clipping matters."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    W[:, torch.randperm(inp, generator=g)[:4]] *= 20
    idx = torch.randint(0, out * inp, (out // 4,), generator=g)
    W.view(-1)[idx] *= 8
    return W.to(dtype)


def activations(seed, inp=IN, batches=3):
    """Calibration inputs with heavy channels (a few x10), as a list of [batch, seq, in] tensors."""
    g = torch.Generator().manual_seed(seed + 1000)
    ch = torch.ones(inp)
    ch[torch.randperm(inp, generator=g)[:6]] = 10.0
    ch *= torch.rand(inp, generator=g) + 0.5
    return [torch.randn(2, 16, inp, generator=g) * ch for _ in range(batches)]


def lib_qparams(W, bits, gs, sym, method, xs=None, **kw):
    """The scale / zero point the library stores: observer(W).get_qparams(), with the imatrix
    statistics gathered by the observer's own forward-pre hook on a Linear."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.observers import Observer

    name = OBSERVER[method]
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel",
                            group_size=gs or None, observer=name, observer_kwargs=dict(kw))
    ob = Observer.load_from_registry(name, base_name="weight", args=args)
    if xs is not None:
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        ob.attach(lin)
        with torch.no_grad():
            for x in xs:
                lin(x)
        ob.detach(lin)
    ob(W)
    q = ob.get_qparams()
    return q["scale"], q["zero_point"]


def assert_same(ours, lib):
    s, z = ours
    s_lib, z_lib = lib
    assert s.dtype == s_lib.dtype and s.shape == s_lib.shape
    assert torch.equal(s, s_lib), f"{(s != s_lib).sum().item()} of {s.numel()} scales differ"
    assert torch.equal(z.to(z_lib.dtype), z_lib)
    assert torch.equal(z, z_lib.to(z.dtype))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,gs,sym", CONFIGS)
def test_mse_bit_exact(bits, gs, sym, dtype):
    W = heavy_weight(bits * 100 + gs, dtype)
    ours = search_qparams(W, bits, gs, sym, "mse")
    assert_same(ours, lib_qparams(W, bits, gs, sym, "mse"))
    # the search actually moved some groups off minmax (else the test proves little)
    assert not torch.equal(ours[0], fake.qparams(W, bits, gs, sym)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,gs,sym", CONFIGS)
def test_imatrix_bit_exact(bits, gs, sym, dtype):
    W = heavy_weight(bits * 100 + gs + 7, dtype)
    xs = activations(bits + gs)
    imp = importance_from_activations(xs)
    ours = search_qparams(W, bits, gs, sym, "imatrix", importance=imp)
    assert_same(ours, lib_qparams(W, bits, gs, sym, "imatrix", xs=xs))
    # importance changes the answer vs the unweighted search with the same grid (at int8 the
    # 5% grid never clips these weights, so both searches keep the full range)
    if bits < 8:
        assert not torch.equal(ours[0], search_qparams(W, bits, gs, sym, "imatrix")[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_imatrix_without_importance_falls_back_like_library(dtype):
    W = heavy_weight(5, dtype)
    assert_same(search_qparams(W, 4, 32, True, "imatrix"), lib_qparams(W, 4, 32, True, "imatrix"))


@pytest.mark.parametrize("method", ["mse", "imatrix"])
def test_observer_kwargs_bit_exact(method):
    W = heavy_weight(11, torch.bfloat16)
    kw = {"maxshrink": 0.5, "grid": 40, "norm": 2.0, "patience": 3}
    xs = activations(3) if method == "imatrix" else None
    imp = importance_from_activations(xs) if xs else None
    ours = search_qparams(W, 4, 32, False, method, importance=imp, **kw)
    assert_same(ours, lib_qparams(W, 4, 32, False, method, xs=xs, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,gs,sym", CONFIGS)
def test_minmax_matches_default_observer(bits, gs, sym, dtype):
    W = heavy_weight(bits + gs, dtype)
    assert_same(search_qparams(W, bits, gs, sym, "minmax"), lib_qparams(W, bits, gs, sym, "minmax"))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (4, 64, False), (8, 0, True)])
def test_quantize_with_matches_fake_quantize(bits, gs, sym, dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    W = heavy_weight(bits * 3 + gs, dtype)
    s_lib, z_lib = lib_qparams(W, bits, gs, sym, "mse")
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel",
                            group_size=gs or None)
    ref = fake_quantize(W, s_lib, z_lib, args)
    s, z = search_qparams(W, bits, gs, sym, "mse")
    out = quantize_with(W, s, z, bits, gs)
    assert out.dtype == W.dtype and torch.equal(out, ref)


def test_search_lowers_weighted_output_error():
    """On a heavy-tailed weight the searched scales beat minmax on sum ||(W - Q(W)) x||^2."""
    W = heavy_weight(42, out=128, inp=256)
    xs = activations(42, inp=256, batches=4)
    X = torch.cat([x.reshape(-1, 256) for x in xs])
    H = X.T @ X
    imp = importance_from_activations(xs)
    err = {}
    for method in ("minmax", "mse", "imatrix"):
        s, z = search_qparams(W, 4, 32, True, method, importance=imp if method == "imatrix" else None)
        err[method] = fake.output_error(W, quantize_with(W, s, z, 4, 32), H)
    assert err["mse"] < 0.98 * err["minmax"], err
    assert err["imatrix"] < err["mse"], err  # heavy input channels: weighting by E[x^2] helps


def test_rejects_bad_arguments():
    W = heavy_weight(1)
    with pytest.raises(ValueError):
        search_qparams(W, 4, 32, True, "nope")
    with pytest.raises(ValueError):
        search_qparams(W, 4, 32, True, "mse", importance=torch.ones(IN))
    with pytest.raises(TypeError):
        search_qparams(W, 4, 32, True, "mse", shrink=0.3)
    with pytest.raises(ValueError):
        search_qparams(W, 4, 48, True, "mse")


@pytest.mark.parametrize("patience", [5, 1, 0])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,gs,sym", CONFIGS)
def test_imatrix_search_with_one_read_equals_the_loop(bits, gs, sym, dtype, patience, monkeypatch):
    """The accelerator's imatrix search (every grid step, then the engine's patience stop replayed
    from one read of which steps improved) gives the loop's scales and zero points bit for bit,
    early stops included; without importance too."""
    from quantfix.quantize import scales

    W = heavy_weight(bits * 100 + gs + 7, dtype)
    imp = importance_from_activations(activations(bits + gs))
    loop = [search_qparams(W, bits, gs, sym, "imatrix", importance=i, patience=patience) for i in (imp, None)]
    real = scales._search_imatrix
    monkeypatch.setattr(scales, "_search_imatrix", lambda *a, **k: real(*a, **k, one_sync=True))
    for i, want in zip((imp, None), loop):
        assert_same(search_qparams(W, bits, gs, sym, "imatrix", importance=i, patience=patience), want)


def test_imatrix_search_with_one_read_stops_where_the_loop_stops(monkeypatch):
    """One group whose error rises for a step and then falls lower: with patience 1 the loop stops
    at the rise (another answer than without a stop), and the one-read search replays that stop."""
    from quantfix.quantize import scales

    W = torch.randn(1, 8, generator=torch.Generator().manual_seed(90))
    stopped = search_qparams(W, 3, 8, False, "imatrix", patience=1)
    assert not torch.equal(stopped[0], search_qparams(W, 3, 8, False, "imatrix", patience=0)[0])
    real = scales._search_imatrix
    monkeypatch.setattr(scales, "_search_imatrix", lambda *a, **k: real(*a, **k, one_sync=True))
    assert_same(search_qparams(W, 3, 8, False, "imatrix", patience=1), stopped)


def test_imatrix_search_copies_no_host_value_to_the_device(monkeypatch):
    """On an accelerator a tensor made from a host value (``torch.tensor(x, device=...)``) is a copy
    the host waits for: the search's grid range and its zero-scale guard were three such copies a grid
    step (demo on one H100: 31 of the option simulation's 54 s in 2100 searches). The one-read search
    makes none, and its importance check reads the device once; the result is the loop's."""
    from quantfix.quantize import scales

    W = heavy_weight(307, torch.float32)
    imp = importance_from_activations(activations(7))
    want = search_qparams(W, 3, 64, True, "imatrix", importance=imp)
    made, reads = [], []
    real_tensor, real_bool = torch.tensor, torch.Tensor.__bool__
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    real = scales._search_imatrix
    monkeypatch.setattr(scales, "_search_imatrix", lambda *a, **k: real(*a, **k, one_sync=True))
    got = search_qparams(W, 3, 64, True, "imatrix", importance=imp)
    assert made == [] and len(reads) == 1
    assert_same(got, want)


@pytest.mark.parametrize("patience", [5, 1, 0])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,gs,sym", CONFIGS)
def test_imatrix_search_over_many_weights_equals_one_search_each(bits, gs, sym, dtype, patience, monkeypatch):
    """Several weights' imatrix searches as one batched search (an accelerator's option simulation: one
    kernel sequence instead of one per module and width) give each weight its own search's scales and
    zero points bit for bit: weighted, unweighted, with an unusable importance (the library's fallback),
    per channel at two row lengths, in batches of several weights and alone."""
    from quantfix.quantize import scales

    shapes = [(64, 128), (32, 128), (16, 256), (48, 128), (8, 256)]
    Ws = [heavy_weight(100 * k + bits + gs, dtype, out=o, inp=i) for k, (o, i) in enumerate(shapes)]
    imps = [importance_from_activations(activations(k + gs, inp=i)) for k, (_, i) in enumerate(shapes)]
    imps[1], imps[3] = None, torch.zeros(128)
    want = [search_qparams(W, bits, gs, sym, "imatrix", importance=i, patience=patience) for W, i in zip(Ws, imps)]
    monkeypatch.setattr(scales, "BATCH_ELEMENTS", 64 * 128 + 32 * 128)  # batches of two and three, one alone
    got = scales.search_imatrix_many(Ws, bits, gs, sym, imps, patience=patience)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_imatrix_search_over_many_weights_stops_each_where_its_own_search_stops():
    """A weight whose search stops early (patience 1) batched with one that keeps improving: each gets
    its own search's stop. The batch's stop (no group of either weight improving) would let the first
    run on to another scale."""
    from quantfix.quantize import scales

    W1 = torch.randn(1, 8, generator=torch.Generator().manual_seed(90))
    W2 = heavy_weight(5, torch.float32, out=64, inp=8)
    stopped = search_qparams(W1, 3, 8, False, "imatrix", patience=1)
    assert not torch.equal(stopped[0], search_qparams(W1, 3, 8, False, "imatrix", patience=0)[0])
    got = scales.search_imatrix_many([W1, W2], 3, 8, False, [None, None], patience=1)
    assert_same(got[0], stopped)
    assert_same(got[1], search_qparams(W2, 3, 8, False, "imatrix", patience=1))
    obs = torch.cat([scales._observed(W, 8).reshape(1, -1, 1, 8) for W in (W1, W2)], dim=1)
    mn, mx = scales._replay_imatrix(obs, 3, False, None, (obs.amin(dim=(0, -1)), obs.amax(dim=(0, -1))),
                                    (0.95, 1, 20, 3.0))
    assert not torch.equal(scales._calc_qparams(mn[:1], mx[:1], 3, False)[0], stopped[0])
