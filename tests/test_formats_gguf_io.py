"""GGUF files (``quantfix.formats.gguf_io``): a repaired plan as llama.cpp ``llama-quantize
--tensor-type`` overrides of the tensors it changed."""
from quantfix import formats
from quantfix.formats import gguf_io
from tests.conftest import tiny_llama
from tests.tiny_checkpoints import GGUF_TYPES, plan0, write_tiny_gguf


def test_gguf_overrides_name_changed_tensors_only(tmp_path):
    from quantfix.plan import Precision

    model = tiny_llama()
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", GGUF_TYPES)
    ext = formats.read(str(path), plan0(model), model)
    repaired = ext.plan.with_changes({"model.layers.0.mlp.gate_proj": Precision(6, 32, True, "gptq_imatrix"),
                                      "model.layers.1.self_attn.q_proj": Precision(16)})
    ov, base = gguf_io.overrides(repaired, ext)
    assert ov == {"blk.0.ffn_gate.weight": "q6_k", "blk.1.attn_q.weight": "f16"}
    assert base == "Q4_0"
    f = gguf_io.write_overrides(repaired, ext, tmp_path, str(path), "parent")
    text = f.read_text()
    assert "llama-quantize --tensor-type '^blk\\.0\\.ffn_gate\\.weight$=q6_k'" in text
    assert text.rstrip().endswith("blk.1.attn_q.weight=f16")
