"""llama.cpp's types in the registry (``quantfix.quantize.gguf``): each entry's simulation is ggml's
own quantize -> dequantize with the module's imatrix (bit for bit), sizes as stored, and the
activation rounding of ggml's Q8_0 / Q8_K matmuls. Needs the built tools (built once per run)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantfix.plan import Precision
from quantfix.quantize import algorithms, gguf
from quantfix.quantize.stats import InputStats
from tests.test_llamacpp import llama_tools  # noqa: F401 - the session fixture that builds the tools


def _stats(cols: int, seed: int = 0) -> InputStats:
    g = torch.Generator().manual_seed(seed)
    diag = torch.rand(cols, generator=g) * 50 + 0.1
    return InputStats(diag * 7, diag.sqrt(), diag.sqrt(), 7)


@pytest.mark.parametrize("type_name", list(gguf.TYPES))
def test_registry_entry_is_ggml_bytes(llama_tools, type_name):  # noqa: F811
    """A gguf entry's simulation is ggml's quantize -> dequantize of the fp16-stored weight with the
    module's E[x^2] as the imatrix, on the type that fits the rows; sizes as stored."""
    from quantfix.llamacpp import ggml

    W = torch.randn(8, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    alg = algorithms.for_ggml_type(type_name)
    t = gguf.TYPES[type_name]
    p = Precision(t.bits, t.block, t.symmetric, alg.name)
    st = _stats(512)
    got = alg.simulate(W, p, algorithms.SimInputs(stats=st, dtype=torch.float16))
    imp = (st.hessian / st.n_tokens).numpy().astype(np.float32)
    want = ggml.dequantize(type_name, ggml.quantize(type_name, W.half().float().numpy(), imp), (8, 512))
    assert torch.equal(got, torch.from_numpy(want)), type_name
    assert p.label == type_name and p.bits_per_weight(512) == ggml.bits_per_weight(type_name)
    assert p.bits_per_weight(576) == ggml.bits_per_weight(ggml.effective_type(type_name, 576))
    assert alg.option_problem() and not alg.exports_exactly and alg.llama_cpp


def test_activation_rounding_is_ggml_q8(llama_tools):  # noqa: F811
    """The trials' input rounding is ggml's Q8_0 (fp16 scale per 32) and Q8_K (float scale per 256)."""
    import ctypes

    from quantfix.llamacpp import ggml

    x = (torch.randn(4, 512, generator=torch.Generator().manual_seed(2)) * torch.logspace(-2, 2, 512)).float()
    q80 = ggml.dequantize("Q8_0", ggml.quantize("Q8_0", x.numpy()), (4, 512))
    assert torch.equal(gguf.act_q8_0(x), torch.from_numpy(q80))
    fn = ggml.library().quantize_row_q8_K_ref  # ggml-quants.h, exported by libggml-base
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    buf = ctypes.create_string_buffer(4 * 2 * 292)
    xs = np.ascontiguousarray(x.numpy())
    fn(xs.ctypes.data, ctypes.addressof(buf), xs.size)
    blocks = np.frombuffer(buf.raw, dtype=np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)]))
    q8k = (blocks["d"][:, None] * blocks["qs"].astype(np.float32)).reshape(4, 512)  # block_q8_K: float d, int8 qs
    d = (gguf.act_q8_k(x) - torch.from_numpy(q8k)).abs()
    assert torch.equal(gguf.act_q8_k(x), torch.from_numpy(q8k)), (float(d.max()), int((d > 0).sum()))
    y = torch.randn(3, 576, requires_grad=True)
    out = gguf.activation("Q4_K")(y)  # rows of 576 never meet a Q8_K matmul: unchanged
    assert torch.equal(out, y)
    z = gguf.activation("Q5_0")(y)
    z.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))  # straight through: the diagnosis backpropagates
