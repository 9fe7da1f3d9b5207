"""quantfix.llamacpp: the pinned llama.cpp build, its quantizers through ctypes (bit for bit what
llama-quantize writes), the imatrix file, GGUF conversion and the quantize / KLD runners.

The tools are built once per cache (``tools.build``: ~12 min on 2 CPU cores, then reused); every
test that needs them takes the ``llama_tools`` fixture. The tiny Llama has rows of 256 (a multiple
of every block), 160 (32-blocks only: K-quants fall back) and 304 (no block: F16) values.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from quantfix.errors import QuantfixError
from quantfix.llamacpp import convert, ggml, imatrix, run, tools

# a type per tensor, cycled: K-quants, legacy quants, IQ types that need no imatrix
CYCLE = ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q3_K", "Q2_K", "IQ4_NL", "Q5_K", "Q4_0", "Q4_1", "Q5_1", "IQ4_XS", "IQ3_S"]


@pytest.fixture(scope="session")
def llama_tools(pytestconfig) -> Path:
    """The pinned llama.cpp tools, built into quantfix's cache once (reused when present); the
    build's progress goes to the terminal, past pytest's capture."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return tools.build(log=lambda s: print(s, flush=True))


@pytest.fixture(scope="session")
def pydoc_text(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tokenizer) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import save_model_dir

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=304, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=40, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("tiny_llamacpp"))


@pytest.fixture(scope="session")
def tiny_f16(llama_tools, tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny.f16.gguf"
    return convert.hf_to_gguf(tiny_hf, out, tools.source_dir(), pre_tokenizer="gpt-2")


@pytest.fixture(scope="session")
def llama_imatrix(tiny_f16, pydoc_text) -> Path:
    return run.compute_imatrix(tiny_f16, pydoc_text, tiny_f16.with_name("llama.imatrix.gguf"), ctx=128, n_chunks=4)


def _tensors(path: Path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _overrides(f16: Path, narrow=("Q6_K", "IQ3_S"), odd=("Q4_K", "Q8_0")):
    """A type for every 2-D tensor: CYCLE, except the rows of 160 (attn_output: ``narrow``, which
    fall back to 32-block types) and of 304 (ffn_down: ``odd``, which end F16)."""
    names = sorted(n for n, t in run.read_types(f16).items() if t == "F16")
    out = {n: CYCLE[i % len(CYCLE)] for i, n in enumerate(names)}
    out.update({f"blk.{i}.attn_output.weight": t for i, t in enumerate(narrow)})
    out.update({f"blk.{i}.ffn_down.weight": t for i, t in enumerate(odd)})
    return out


# --- without a build -------------------------------------------------------------------------

def test_find_without_build_names_the_build_command(tmp_path):
    with pytest.raises(QuantfixError) as e:
        tools.find("llama-quantize", tmp_path)
    msg = str(e.value)
    assert "python -m quantfix.tools build" in msg and "\n" not in msg
    p = subprocess.run([sys.executable, "-m", "quantfix.tools", "where", "--cache", str(tmp_path)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "python -m quantfix.tools build" in p.stderr


@pytest.mark.parametrize("cols,asked,written", [
    # SmolLM2-135M: hidden 576 (ffn 1536 = 6 x 256: down rows keep the K-quant)
    (576, "Q4_K", "Q5_0"), (576, "Q5_K", "Q5_1"), (576, "Q6_K", "Q8_0"), (576, "Q2_K", "Q4_0"),
    (576, "Q3_K", "Q4_0"), (576, "IQ4_XS", "IQ4_NL"), (576, "IQ2_XXS", "IQ4_NL"), (1536, "Q4_K", "Q4_K"),
    # Gemma-3-270M: hidden 640, ffn 2048 (a multiple of 256)
    (640, "Q4_K", "Q5_0"), (640, "Q6_K", "Q8_0"), (2048, "Q6_K", "Q6_K"),
    # 32-block types fit both; a row that is not a multiple of 32 is stored F16
    (576, "Q8_0", "Q8_0"), (576, "IQ4_NL", "IQ4_NL"), (304, "Q4_K", "F16"), (304, "Q8_0", "F16"),
    (304, "f16", "F16"), (256, "q4_k", "Q4_K"),
])
def test_effective_type_is_llama_quant_fallback(cols, asked, written):
    assert ggml.effective_type(asked, cols) == written


def test_effective_type_without_fallback_and_bits():
    with pytest.raises(QuantfixError, match="no fallback for Q8_K"):
        ggml.effective_type("Q8_K", 576)
    with pytest.raises(QuantfixError, match="unknown ggml type"):
        ggml.effective_type("Q4_K_M", 576)
    bits = {"Q4_K": 4.5, "Q6_K": 6.5625, "Q2_K": 2.625, "Q3_K": 3.4375, "Q5_K": 5.5, "Q8_0": 8.5, "Q4_0": 4.5,
            "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "F16": 16.0}
    assert {t: ggml.bits_per_weight(t) for t in bits} == bits
    assert ggml.requires_imatrix("IQ2_XS") and not ggml.requires_imatrix("IQ2_XS", "token_embd.weight")
    assert not ggml.requires_imatrix("Q2_K")


def test_imatrix_write_read_and_weights(tmp_path):
    sums = np.array([4.0, 0.0, 9.0, 1.0], dtype=np.float32)
    experts = np.arange(8, dtype=np.float32).reshape(2, 4)
    path = imatrix.write(tmp_path / "i.gguf", {"blk.0.attn_q.weight": (sums, 2), "blk.0.ffn_up.weight": (experts, [4, 0])},
                         datasets=["calib.txt"], chunk_count=3, chunk_size=128)
    back = imatrix.read(path)
    np.testing.assert_array_equal(back["blk.0.attn_q.weight"][0], sums[None])
    np.testing.assert_array_equal(back["blk.0.ffn_up.weight"][1], [4, 0])
    np.testing.assert_array_equal(imatrix.weights(sums, 2), [2.0, 0.0, 4.5, 0.5])
    np.testing.assert_array_equal(imatrix.weights(experts, [4, 0]), [0, 0.25, 0.5, 0.75, 1, 1, 1, 1])
    with pytest.raises(QuantfixError, match="GGUF weight names"):
        imatrix.write(tmp_path / "x.gguf", {"model.layers.0.q_proj": (sums, 2)})
    with pytest.raises(QuantfixError, match=">= 0"):
        imatrix.write(tmp_path / "x.gguf", {"blk.0.attn_q.weight": (-sums, 2)})
    names = imatrix.gguf_names(["model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"], "llama", 2)
    assert names == {"model.layers.1.self_attn.v_proj": "blk.1.attn_v.weight",
                     "model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight"}


def test_build_runs_once_under_the_lock(tmp_path, monkeypatch):
    """Two concurrent builds into one cache: one builds, the other waits and finds the install."""
    calls, logs = [], []

    def fake_build(work, base, jobs, sdist, log):
        calls.append(work)
        time.sleep(0.5)
        (work / "stage" / "bin").mkdir(parents=True)
        (work / "stage" / "manifest.json").write_text('{"build_seconds": 0.5}')
        return {"build_seconds": 0.5}

    monkeypatch.setattr(tools, "_build_into", fake_build)
    threads = [threading.Thread(target=tools.build, args=(tmp_path,), kwargs={"log": logs.append}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (tools.install_dir(tmp_path) / "manifest.json").is_file()
    assert any("waiting" in s for s in logs) and any("already built" in s for s in logs)
    assert [p.name for p in (tmp_path / "llama.cpp").iterdir() if p.name.startswith(".build")] == []


# --- with the built tools --------------------------------------------------------------------

def test_tables_match_the_library(llama_tools):
    assert tools.manifest()["ggml_types"] == {**ggml.TYPE_IDS, "COUNT": 43}
    for t, (block, nbytes) in ggml.BLOCKS.items():
        tr = ggml.traits(t)
        assert (tr["name"].upper(), tr["block"], tr["bytes"]) == (t, block, nbytes)


def test_ggml_roundtrip_agrees_with_gguf_py(llama_tools):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    W = np.random.default_rng(0).normal(0, 0.05, size=(16, 512)).astype(np.float32)
    err = {}
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"):
        data = ggml.quantize(t, W)
        R = ggml.dequantize(t, data, W.shape)
        ref = dequantize(np.frombuffer(data, dtype=np.uint8).reshape(16, -1), GGMLQuantizationType[t])
        np.testing.assert_allclose(R, ref, rtol=1e-6, atol=1e-7, err_msg=t)
        err[t] = float(np.sqrt(np.mean((R - W) ** 2)))
    assert err["Q8_0"] < err["Q6_K"] < err["Q4_K"] < err["Q3_K"] < err["Q2_K"], err
    with pytest.raises(QuantfixError, match="not a whole number of Q4_K blocks"):
        ggml.quantize("Q4_K", W[:, :320])
    with pytest.raises(QuantfixError, match="without an importance matrix"):
        ggml.quantize("IQ2_XXS", W)


def test_hf_conversion_names_the_pre_tokenizer_fix(llama_tools, tiny_hf, tmp_path):
    with pytest.raises(QuantfixError, match="pre_tokenizer=") as e:
        convert.hf_to_gguf(tiny_hf, tmp_path / "x.gguf", tools.source_dir())
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_llama_quantize_is_bit_exact_with_and_without_imatrix(tiny_f16, llama_imatrix, tmp_path):
    """Every tensor llama-quantize writes, asked per tensor for a type (and with an imatrix file
    of ours), is ggml.simulate's type and bytes for the same F16 values and importance."""
    stats = imatrix.read(llama_imatrix)
    ours = imatrix.write(tmp_path / "ours.imatrix.gguf", stats, ["pydoc.txt"], chunk_count=4, chunk_size=128)
    src = _tensors(tiny_f16)
    fallbacks = set()
    for im, narrow in ((None, ("Q6_K", "IQ3_S")), (ours, ("Q4_K", "Q2_K"))):
        tt = _overrides(tiny_f16, narrow)
        out, types = run.quantize(tiny_f16, tmp_path / f"q{im is not None}.gguf", "Q8_0", tt, imatrix=im)
        written = _tensors(out)
        for name, asked in tt.items():
            W = np.array(src[name].data, dtype=np.float32)
            weights = imatrix.weights(*stats[name]) if im is not None and name in stats else None
            want_type, want = ggml.simulate(asked, W, weights)
            assert types[name] == want_type == ggml.effective_type(asked, W.shape[1]), name
            assert np.asarray(written[name].data).tobytes() == want, (name, asked, want_type)
            if asked != want_type:
                fallbacks.add((asked, want_type))
    assert fallbacks == {("Q6_K", "Q8_0"), ("IQ3_S", "IQ4_NL"), ("Q4_K", "Q5_0"), ("Q2_K", "Q4_0"),
                         ("Q4_K", "F16"), ("Q8_0", "F16")}
    assert (tmp_path / "qTrue.gguf.tensor-types.txt").read_text().startswith("^blk\\.0\\.attn_k\\.weight$=")


def test_our_imatrix_equals_llama_imatrix_and_changes_the_result(tiny_f16, llama_imatrix, tmp_path):
    stats = imatrix.read(llama_imatrix)
    assert sorted(stats) == sorted(n for n in run.read_types(tiny_f16) if n.startswith("blk.") and "norm" not in n)
    ours = imatrix.write(tmp_path / "ours.gguf", stats, ["pydoc.txt"], chunk_count=4, chunk_size=128)
    tt = {n: "Q4_K" for n in stats if "attn_output" not in n and "ffn_down" not in n}
    files = {k: run.quantize(tiny_f16, tmp_path / f"{k}.gguf", "Q4_0", tt, imatrix=im)[0]
             for k, im in (("llama", llama_imatrix), ("ours", ours), ("none", None))}
    a, b, c = (_tensors(files[k]) for k in ("llama", "ours", "none"))
    for name in a:
        assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes(), name
    changed = [n for n in tt if np.asarray(a[n].data).tobytes() != np.asarray(c[n].data).tobytes()]
    assert changed == list(tt), set(tt) - set(changed)


def test_quantize_refuses_bad_requests(tiny_f16, tmp_path):
    with pytest.raises(QuantfixError, match="no tensor 'blk.0.attn_q'"):
        run.quantize(tiny_f16, tmp_path / "x.gguf", "Q4_K_M", {"blk.0.attn_q": "q4_k"})
    with pytest.raises(QuantfixError, match="needs an imatrix for IQ2_XS"):
        run.quantize(tiny_f16, tmp_path / "x.gguf", "Q4_K_M", {"blk.0.attn_q.weight": "iq2_xs"})
    with pytest.raises(QuantfixError, match="ignores --tensor-type with base type F16"):
        run.quantize(tiny_f16, tmp_path / "x.gguf", "F16", {"blk.0.attn_q.weight": "q8_0"})
    with pytest.raises(QuantfixError, match="no type 'Q4_KM'"):
        run.quantize(tiny_f16, tmp_path / "x.gguf", "Q4_KM")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_f16.read_bytes()[: 1 << 16])
    with pytest.raises(QuantfixError, match="could not read GGUF file"):
        run.quantize(bad, tmp_path / "x.gguf", "Q8_0")
    wrong = imatrix.write(tmp_path / "wrong.gguf", {"blk.0.attn_q.weight": (np.ones(100), 4)})
    with pytest.raises(QuantfixError, match="llama-quantize failed .*imatrix size 100 is different") as e:
        run.quantize(tiny_f16, tmp_path / "x.gguf", "Q4_K_M", imatrix=wrong)
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plan_is_what_llama_quantize_writes(tiny_f16, tmp_path):
    """The dry run's types (llama.cpp's Q4_K_M mixture, an override, the fallback) are the file's."""
    planned = run.plan(tiny_f16, "Q4_K_M", {"blk.1.attn_q.weight": "q6_k"})
    _, written = run.quantize(tiny_f16, tmp_path / "m.gguf", "Q4_K_M", {"blk.1.attn_q.weight": "q6_k"})
    assert planned == written
    assert written["blk.1.attn_q.weight"] == "Q6_K" and written["blk.0.attn_k.weight"] == "Q4_K"
    # Q4_K_M: use_more_bits(i, 2 layers) holds for the last layer only: Q6_K there
    assert (written["blk.0.attn_v.weight"], written["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    assert written["blk.0.attn_output.weight"] == "Q5_0"  # Q4_K on rows of 160
    assert written["output.weight"] == "Q6_K" and written["output_norm.weight"] == "F32"


def test_gguf_to_f16_is_the_float_parent(tiny_f16, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    q, _ = run.quantize(tiny_f16, tmp_path / "q.gguf", "Q4_0")
    with pytest.raises(QuantfixError, match="not a float GGUF"):
        run.quantize(q, tmp_path / "qq.gguf", "Q8_0")
    f = convert.gguf_to_f16(q, tmp_path / "f.gguf")
    types = run.read_types(f)
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    rq, rf = GGUFReader(str(q)), GGUFReader(str(f))
    for t in rq.tensors:
        want = dequantize(t.data, t.tensor_type).astype(np.float16 if types[t.name] == "F16" else np.float32)
        np.testing.assert_array_equal(np.asarray(rf.get_tensor([x.name for x in rf.tensors].index(t.name)).data), want)
    fq, ff = ({k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")} for r in (rq, rf))
    assert fq.pop("general.file_type") == 2 and ff.pop("general.file_type") == 1 and fq == ff
    _, again = run.quantize(f, tmp_path / "again.gguf", "Q8_0")
    assert again["blk.0.attn_q.weight"] == "Q8_0"


def test_kld_of_the_float_model_against_itself(tiny_f16, pydoc_text, tmp_path):
    base = run.kld_base(tiny_f16, pydoc_text, ctx=128, n_chunks=4, out=tmp_path / "base.bin")
    assert run.base_header(base) == (128, 384, 4)
    same = run.kld(tiny_f16, base)
    assert same["n_chunks"] == 4 and same["n_tokens"] == 4 * 63
    assert abs(same["kld_mean"]) < 1e-4 and same["kld_p99"] < 1e-4 and same["same_top_p"] == 1.0
    assert same["ppl"] == pytest.approx(same["ppl_base"], rel=1e-4) and 10 < same["ppl"] < 1000
    q, _ = run.quantize(tiny_f16, tmp_path / "q2.gguf", "Q2_K")
    worse = run.kld(q, base)
    assert worse["kld_mean"] > 100 * max(abs(same["kld_mean"]), 1e-6) and worse["same_top_p"] < 1.0
    assert worse["ppl_base"] == pytest.approx(same["ppl_base"], rel=1e-4)


def test_kld_below_100_tokens_reads_the_chunk_rows(tiny_f16, pydoc_text, tmp_path):
    """One chunk of 128 scores 63 tokens: llama-perplexity prints no statistics block then."""
    base = run.kld_base(tiny_f16, pydoc_text, ctx=128, n_chunks=1, out=tmp_path / "b1.bin")
    r = run.kld(tiny_f16, base)
    assert r["n_tokens"] == 63 and r["kld_p99"] is None and abs(r["kld_mean"]) < 1e-4 and r["ppl"] > 1
    with pytest.raises(QuantfixError, match="not a llama-perplexity"):
        run.kld(tiny_f16, pydoc_text)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(QuantfixError, match="tokens") as e:
        run.kld_base(tiny_f16, short, ctx=128, out=tmp_path / "b2.bin")
    assert "\n" not in str(e.value) and not (tmp_path / "b2.bin").exists()


def test_tools_where_lists_the_install(llama_tools):
    p = subprocess.run([sys.executable, "-m", "quantfix.tools", "where"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    for t in tools.TOOLS:
        assert str(llama_tools / "bin" / t) in p.stdout
