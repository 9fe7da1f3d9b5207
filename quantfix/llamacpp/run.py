"""Runners for llama.cpp's own tools: ``llama-quantize`` with per-tensor types (and an imatrix),
and ``llama-perplexity``'s KL divergence against a float model's saved log-probabilities.

CLI used (this version, build 11434):
    llama-quantize [--tensor-type-file F] [--imatrix I] [--dry-run] IN.gguf [OUT.gguf] BASE THREADS
        F holds ``^blk\\.0\\.attn_q\\.weight$=q6_K`` entries: std::regex_search patterns (lower-cased),
        the first match wins, anchored here to one exact tensor each. An override skips llama.cpp's
        mixture rules for that tensor but not the row-length fallback (``ggml.effective_type``).
        Overrides only act when BASE is a quantized type.
    llama-perplexity -m F16.gguf -f TEXT -c CTX [--chunks N] --kl-divergence-base BASE.bin -t 2
    llama-perplexity -m Q.gguf --kl-divergence-base BASE.bin --kl-divergence -c CTX -t 2
    llama-imatrix -m F16.gguf -f TEXT -o OUT.gguf -c CTX [--chunks N] -t 2 --no-ppl
Both tools print their errors and llama-perplexity exits 0 on several of them (too little text,
an unreadable base file), so success is judged by what they printed, not only by the exit code.
"""
from __future__ import annotations

import math
import os
import re
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from quantfix.errors import QuantfixError
from quantfix.llamacpp import ggml
from quantfix.llamacpp.tools import find

# llama-quantize's QUANT_OPTIONS (file types: a base type plus llama.cpp's per-tensor mixture)
FTYPES = ("Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
          "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K", "IQ3_XS",
          "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S",
          "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "COPY")
FLOAT_FTYPES = ("F16", "BF16", "F32", "COPY")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|nan|inf)"
_ROW = re.compile(rf"^\s*(\d+)\s+({_NUM})\s+±\s+{_NUM}\s+({_NUM})\s+±\s+{_NUM}\s+({_NUM})\s+±\s+{_NUM}"
                  rf"\s+({_NUM})\s+±\s+{_NUM}\s*%\s+({_NUM})\s+±\s+{_NUM}\s*%")
_STAT = re.compile(rf"^([^:=]+?)\s*:\s*({_NUM})(?:\s*±\s*({_NUM}))?\s*%?\s*$")
_PLAN = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^(]*(?:\((\w+)\))?\s*$")
_STATS = {"Mean PPL(Q)": "ppl", "Mean PPL(base)": "ppl_base", "Mean ln(PPL(Q)/PPL(base))": "ln_ppl_ratio",
          "Mean KLD": "kld_mean", "Maximum KLD": "kld_max", "99.9% KLD": "kld_p999", "99.0% KLD": "kld_p99",
          "95.0% KLD": "kld_p95", "90.0% KLD": "kld_p90", "Median KLD": "kld_median",
          "RMS Δp": "rms_dp_pct", "Same top p": "same_top_p_pct"}


def _run(cmd: List[str], what: str, timeout: float) -> str:
    """Run a tool; its stdout and stderr together. A non-zero exit or a timeout raises one line."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise QuantfixError(f"{what} took over {timeout:.0f} s: {' '.join(cmd[:3])} ...") from e
    if p.returncode != 0:
        raise QuantfixError(f"{what} failed (exit {p.returncode}): {_reason(p.stdout)}")
    return p.stdout


def _reason(text: str) -> str:
    """The line of a tool's output that says what went wrong: its first error-level log line
    (``0.01.234.567 E ...``), else the first line naming an error or a failure."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("=-")]
    for ln in lines:
        m = re.match(r"^[\d.]+ E (.*\S)", ln)
        if m and len(m.group(1)) > 3:
            return m.group(1)[:300]
    for key in ("error", "ERROR", "failed", "invalid", "unable"):
        hits = [ln for ln in lines if key in ln]
        if hits:
            return hits[0][:300]
    return lines[-1][:300] if lines else "no output"


def _timeout(path: Path) -> float:
    """Generous: 10 min plus 20 min per GB of input."""
    return 600 + 1200 * Path(path).stat().st_size / 1e9


def read_types(path: Path) -> Dict[str, str]:
    """Every tensor's stored type in a GGUF file (gguf-py's names: Q4_K, F16...)."""
    from gguf import GGUFReader

    try:
        return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    except Exception as e:  # noqa: BLE001 - a damaged file raises many types
        raise QuantfixError(f"could not read GGUF file {path} ({type(e).__name__}: {str(e)[:120]})") from e


def _regex(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9_.]+", name):
        raise QuantfixError(f"tensor name {name!r}: expected a GGUF name like blk.0.attn_q.weight")
    return "^" + name.replace(".", r"\.") + "$"


def _overrides(f16_gguf: Path, base_type: str, tensor_types: Mapping[str, str], has_imatrix: bool) -> Dict[str, str]:
    """Check the request against the input file; the overrides with canonical type names."""
    base = base_type.upper()
    if base not in FTYPES:
        raise QuantfixError(f"llama-quantize has no type {base_type!r}: one of {', '.join(FTYPES)}")
    types = read_types(f16_gguf)
    quantized = sorted(n for n, t in types.items() if t not in ggml.FLOAT_TYPES)
    if quantized:
        raise QuantfixError(f"{f16_gguf} is not a float GGUF ({quantized[0]} is {types[quantized[0]]}): "
                            "quantize its float parent (convert.gguf_to_f16)")
    if tensor_types and base in FLOAT_FTYPES:
        raise QuantfixError(f"llama-quantize ignores --tensor-type with base type {base}: use a quantized base type")
    out = {}
    for name, t in tensor_types.items():
        if name not in types:
            raise QuantfixError(f"{f16_gguf} has no tensor {name!r} (tensor_types must use GGUF names)")
        out[name] = ggml.type_name(t)
        if ggml.requires_imatrix(out[name], name) and not has_imatrix:
            raise QuantfixError(f"{name}={out[name]}: llama-quantize needs an imatrix for {out[name]}")
    return out


def _quantize_cmd(f16_gguf: Path, out: Optional[Path], base_type: str, overrides: Mapping[str, str],
                  imatrix: Optional[Path], type_file: Path, threads: int, cache: Optional[Path]) -> List[str]:
    cmd = [str(find("llama-quantize", cache))]
    if overrides:
        type_file.write_text("".join(f"{_regex(n)}={t.lower()}\n" for n, t in sorted(overrides.items())))
        cmd += ["--tensor-type-file", str(type_file)]
    if imatrix is not None:
        if not Path(imatrix).is_file():
            raise QuantfixError(f"imatrix file {imatrix} does not exist")
        cmd += ["--imatrix", str(imatrix)]
    if out is None:
        cmd.append("--dry-run")
    return cmd + [str(f16_gguf)] + ([str(out)] if out is not None else []) + [base_type.upper(), str(threads)]


def quantize(f16_gguf: Path, out_gguf: Path, base_type: str, tensor_types: Optional[Mapping[str, str]] = None,
             imatrix: Optional[Path] = None, cache: Optional[Path] = None, threads: int = 2,
             ) -> Tuple[Path, Dict[str, str]]:
    """``llama-quantize`` the float GGUF to ``base_type`` (a llama-quantize type: Q4_K_M, Q6_K...)
    with ``tensor_types`` (GGUF tensor name -> ggml type) overriding single tensors, optionally with
    an imatrix file. Returns (the output path, every tensor's type as written, read back)."""
    f16_gguf, out_gguf = Path(f16_gguf), Path(out_gguf)
    if not f16_gguf.is_file():
        raise QuantfixError(f"GGUF file {f16_gguf} does not exist")
    ov = _overrides(f16_gguf, base_type, dict(tensor_types or {}), imatrix is not None)
    tmp = out_gguf.with_name(f".{out_gguf.name}.{os.getpid()}.tmp")
    type_file = out_gguf.with_name(out_gguf.name + ".tensor-types.txt")
    cmd = _quantize_cmd(f16_gguf, tmp, base_type, ov, imatrix, type_file, threads, cache)
    try:
        _run(cmd, "llama-quantize", _timeout(f16_gguf))
        tmp.replace(out_gguf)
    finally:
        tmp.unlink(missing_ok=True)
    return out_gguf, read_types(out_gguf)


def plan(f16_gguf: Path, base_type: str, tensor_types: Optional[Mapping[str, str]] = None,
         imatrix: Optional[Path] = None, cache: Optional[Path] = None) -> Dict[str, str]:
    """The type every tensor would get (``llama-quantize --dry-run``: llama.cpp's own mixture
    rules, the overrides and the fallback), without writing a file."""
    import tempfile

    f16_gguf = Path(f16_gguf)
    ov = _overrides(f16_gguf, base_type, dict(tensor_types or {}), imatrix is not None)
    with tempfile.TemporaryDirectory() as d:
        cmd = _quantize_cmd(f16_gguf, None, base_type, ov, imatrix, Path(d) / "types.txt", 1, cache)
        text = _run(cmd, "llama-quantize --dry-run", _timeout(f16_gguf))
    out = {}
    for line in text.splitlines():
        m = _PLAN.match(line.strip())
        if m:
            out[m.group(1)] = (m.group(3) or m.group(2)).upper()
    if not out:
        raise QuantfixError(f"llama-quantize --dry-run printed no tensor lines: {_reason(text)}")
    return out


def kld_base(f16_gguf: Path, text_file: Path, ctx: int = 512, n_chunks: Optional[int] = None,
             out: Optional[Path] = None, cache: Optional[Path] = None, threads: int = 2) -> Path:
    """Save the float model's log-probabilities on ``text_file`` (``--kl-divergence-base``): the
    reference every quantized file is compared with. ~2 bytes x vocab per scored token (ctx/2 per
    chunk; SmolLM2's 49,152 tokens at ctx 512: 25 MB a chunk, 14 GB for all of WikiText-2's
    test split): bound ``n_chunks``. Returns the file (default: beside the model)."""
    f16_gguf, text_file = Path(f16_gguf), Path(text_file)
    for p in (f16_gguf, text_file):
        if not p.is_file():
            raise QuantfixError(f"{p} does not exist")
    out = Path(out) if out else f16_gguf.with_name(f"{f16_gguf.stem}.kld-c{ctx}-n{n_chunks or 'all'}.bin")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [str(find("llama-perplexity", cache)), "-m", str(f16_gguf), "-f", str(text_file), "-c", str(ctx),
           "--kl-divergence-base", str(tmp), "-t", str(threads)] + (["--chunks", str(n_chunks)] if n_chunks else [])
    try:
        text = _run(cmd, "llama-perplexity --kl-divergence-base", _timeout(f16_gguf) + 60 * (n_chunks or 100))
        if "Final estimate: PPL" not in text:
            raise QuantfixError(f"llama-perplexity saved no log-probabilities: {_reason(text)}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def compute_imatrix(f16_gguf: Path, text_file: Path, out: Path, ctx: int = 512, n_chunks: Optional[int] = None,
                    cache: Optional[Path] = None, threads: int = 2) -> Path:
    """llama.cpp's own importance matrix of ``f16_gguf`` on ``text_file`` (``llama-imatrix``,
    GGUF format, blk.* weights only): the reference quantfix's own file is checked against."""
    f16_gguf, text_file, out = Path(f16_gguf), Path(text_file), Path(out)
    for p in (f16_gguf, text_file):
        if not p.is_file():
            raise QuantfixError(f"{p} does not exist")
    tmp = out.with_name(f".{os.getpid()}.{out.stem}.gguf")
    cmd = [str(find("llama-imatrix", cache)), "-m", str(f16_gguf), "-f", str(text_file), "-o", str(tmp),
           "-c", str(ctx), "-t", str(threads), "--no-ppl"] + (["--chunks", str(n_chunks)] if n_chunks else [])
    try:
        text = _run(cmd, "llama-imatrix", _timeout(f16_gguf) + 60 * (n_chunks or 100))
        if not tmp.is_file():
            raise QuantfixError(f"llama-imatrix wrote no file: {_reason(text)}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def base_header(base_file: Path) -> Tuple[int, int, int]:
    """(n_ctx, n_vocab, n_chunks) of a ``--kl-divergence-base`` file."""
    with open(base_file, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != b"_logits_":
        raise QuantfixError(f"{base_file} is not a llama-perplexity --kl-divergence-base file")
    return struct.unpack("<Iii", head[8:20])


def kld(quant_gguf: Path, base_file: Path, cache: Optional[Path] = None, threads: int = 2) -> Dict:
    """KL divergence of a GGUF's next-token distribution from the saved float one
    (``--kl-divergence``), parsed from llama-perplexity's printed statistics: ppl, ppl_base,
    kld_mean, kld_p99 (None below 100 scored tokens, where the tool prints only per-chunk rows),
    same_top_p (a fraction), n_chunks, n_ctx, n_tokens..."""
    quant_gguf, base_file = Path(quant_gguf), Path(base_file)
    if not quant_gguf.is_file():
        raise QuantfixError(f"GGUF file {quant_gguf} does not exist")
    n_ctx, _, n_chunks = base_header(base_file)
    cmd = [str(find("llama-perplexity", cache)), "-m", str(quant_gguf), "--kl-divergence-base", str(base_file),
           "--kl-divergence", "-c", str(n_ctx), "-t", str(threads)]
    text = _run(cmd, "llama-perplexity --kl-divergence", _timeout(quant_gguf) + 60 * n_chunks)
    if "inconsistent vocabulary" in text:  # the tool says so, then goes on comparing other tokens
        raise QuantfixError(f"{quant_gguf} and {base_file} do not share a vocabulary: {_reason(text)}")
    return parse_kld(text, n_ctx)


def _num(s: Optional[str]) -> Optional[float]:
    return None if s is None else float(s)


def parse_kld(text: str, n_ctx: int) -> Dict:
    """The statistics of a ``llama-perplexity --kl-divergence`` output (see ``kld``)."""
    rows = [m for m in map(_ROW.match, text.splitlines()) if m]
    if not rows:
        raise QuantfixError(f"llama-perplexity --kl-divergence printed no results: {_reason(text)}")
    last = rows[-1]
    out = {"ppl": float(last.group(2)), "ln_ppl_ratio": float(last.group(3)), "kld_mean": float(last.group(4)),
           "rms_dp_pct": float(last.group(5)), "same_top_p_pct": float(last.group(6)), "kld_p99": None}
    for line in text.splitlines():
        m = _STAT.match(line.strip())
        key = _STATS.get(" ".join(m.group(1).split())) if m else None
        if key:
            out[key] = float(m.group(2))
            if key == "kld_mean":
                out["kld_mean_err"] = _num(m.group(3))
    out.setdefault("ppl_base", out["ppl"] / math.exp(out["ln_ppl_ratio"]))
    out["same_top_p"] = out.pop("same_top_p_pct") / 100
    out.update(n_chunks=len(rows), n_ctx=n_ctx, n_tokens=len(rows) * (n_ctx - 1 - n_ctx // 2))
    return out
