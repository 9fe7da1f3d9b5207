"""The float GGUF that llama-quantize starts from: (a) an HF model directory converted by the
pinned source's own ``convert_hf_to_gguf.py`` (offline), (b) an existing quantized GGUF with every
quantized tensor dequantized (gguf-py) to F16, the way that converter stores a float model: 1-D
tensors and norms F32, float tensors as they are, all metadata and the tokenizer kept.

(a) runs the converter with the pinned source's gguf-py first on ``sys.path`` (that is what
``convert_hf_to_gguf.py`` does itself; the PyPI ``gguf`` 0.19.0 is an older snapshot of it) in a
subprocess with the hub switched off. llama.cpp recognises a BPE tokenizer by hashing how it
splits a fixed text; an unknown one stops the converter ("BPE pre-tokenizer was not
recognized"). ``pre_tokenizer=`` names the llama.cpp pre-tokenizer to write in that case
(e.g. ``gpt-2`` for a byte-level BPE): the user's explicit choice, never a silent default.

(b) is exact where it matters: gguf-py's dequantization equals ggml's ``to_float`` on all 134.5 M
weights of the SmolLM2 Q4_1 demo file, and llama-quantize re-quantizing its F16 parent to Q4_1
(token_embd Q8_0) writes all 211 quantized tensors byte for byte as in the original file.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from quantfix.errors import QuantfixError

# runs convert_hf_to_gguf.py as __main__; argv: script, pre-tokenizer ('' = none), converter args.
# The converter imports sentencepiece before it looks for tokenizer.model (and uses tokenizer.json
# when there is none): the look comes first here, so a model without one converts without the package.
_RUNNER = """
import os, runpy, sys
script, pre = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
sys.path.insert(0, os.path.dirname(script))
from conversion.base import TextModel
_spm = TextModel._create_vocab_sentencepiece
def _spm_first_look(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
    return _spm(self)
TextModel._create_vocab_sentencepiece = _spm_first_look
if pre:
    _orig = TextModel.get_vocab_base_pre
    def _pre(self, tokenizer):
        try:
            return _orig(self, tokenizer)
        except NotImplementedError:
            print(f"quantfix: unrecognized BPE pre-tokenizer, writing {pre!r} as asked", file=sys.stderr)
            return pre
    TextModel.get_vocab_base_pre = _pre
runpy.run_path(script, run_name="__main__")
"""


def _failure(text: str) -> str:
    """The line of the converter's output that says why it failed."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def hf_to_gguf(model_dir: Path, out: Path, source: Path, outtype: str = "f16",
               pre_tokenizer: Optional[str] = None, timeout: float = 3600) -> Path:
    """Convert an HF model directory to a GGUF (``outtype`` f16 / bf16 / f32) with the converter in
    ``source`` (``tools.source_dir(cache)``). Written to a temporary name and renamed."""
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise QuantfixError(f"{model_dir} is not an HF model directory (no config.json)")
    script = Path(source) / "convert_hf_to_gguf.py"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, "-c", _RUNNER, str(script), pre_tokenizer or "", str(model_dir),
           "--outfile", str(tmp), "--outtype", outtype]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        tmp.unlink(missing_ok=True)
        raise QuantfixError(f"convert_hf_to_gguf.py on {model_dir} took over {timeout:.0f} s") from e
    if p.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        hint = ("; pass pre_tokenizer= (e.g. 'gpt-2') to name llama.cpp's pre-tokenizer for it"
                if "pre-tokenizer was not recognized" in p.stderr else "")
        raise QuantfixError(f"convert_hf_to_gguf.py failed on {model_dir}: {_failure(p.stderr + p.stdout)}{hint}")
    tmp.replace(out)
    return out


def _float_type(t, gguf):
    """The type a tensor gets in the float file: float types stay, quantized 1-D tensors, norms and
    non-weights F32 (as convert_hf_to_gguf stores them), other quantized tensors F16."""
    Q = gguf.GGMLQuantizationType
    if t.tensor_type in (Q.F32, Q.F16, Q.BF16, Q.F64):
        return t.tensor_type
    if len(t.shape) <= 1 or t.name.endswith("_norm.weight") or not t.name.endswith(".weight"):
        return Q.F32
    return Q.F16


def _float_data(t, qtype, gguf) -> np.ndarray:
    """A tensor's values in its float-file type; F32 where F16 would overflow."""
    from gguf.quants import dequantize

    if qtype == t.tensor_type:
        return t.data
    x = dequantize(t.data, t.tensor_type).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        h = x.astype(np.float16)
        if np.isfinite(h).all() or not np.isfinite(x).all():
            return h
        raise QuantfixError(f"{t.name}: values beyond float16's range; the float parent would need F32")
    return x


def _copy_fields(reader, writer, gguf) -> None:
    """Every key of the source (the tokenizer included) except the ones the writer owns; the file
    type becomes MOSTLY_F16 and the data alignment is kept."""
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        if f.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            continue
        if f.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(f.contents())
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)


def gguf_to_f16(src: Path, dst: Path) -> Path:
    """The float parent of a quantized GGUF: every quantized tensor dequantized with gguf-py and
    stored F16 (F32 for 1-D tensors and norms), every float tensor and all metadata as they are.
    Tensors are dequantized one at a time while writing (memory: one tensor). Atomic."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as e:  # noqa: BLE001 - a damaged file raises many types
        raise QuantfixError(f"could not read GGUF file {src} ({type(e).__name__}: {str(e)[:120]})") from e
    arch = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise QuantfixError(f"{src} has no general.architecture: not a model file")
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=str(arch.contents()), endianess=reader.endianess)
    _copy_fields(reader, writer, gguf)
    plan = [(t, _float_type(t, gguf)) for t in reader.tensors]
    for t, q in plan:
        shape = tuple(int(n) for n in reversed(t.shape))
        nbytes = int(np.prod(shape)) * gguf.GGML_QUANT_SIZES[q][1] // gguf.GGML_QUANT_SIZES[q][0]
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for t, q in plan:
            writer.write_tensor_data(np.ascontiguousarray(_float_data(t, q, gguf)))
    finally:
        writer.close()
    tmp.replace(dst)
    return dst
