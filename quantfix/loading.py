"""Loading and checking: the float model and its tokenizer loaded with transformers, on the run's
device (or spread by accelerate), refused in one line when it is not there, cannot be read, or is
not a decoder-only causal LM with a trained LM head."""
from __future__ import annotations

import atexit
import json
import logging
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch

from quantfix.config import ModelConfig
from quantfix.errors import QuantfixError
from quantfix.source import ResolvedModel
from quantfix.weights import capped_memory

log = logging.getLogger(__name__)


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


def placement_kwargs(device_map: Optional[str], max_memory: Optional[dict] = None,
                     offload_folder: Optional[str] = None) -> dict:
    """from_pretrained's device_map / max_memory / offload_folder for accelerate (empty without a
    device map). GPU indices may come in as strings from YAML; disk offload goes to a temporary
    folder, removed at exit, unless one is given."""
    if not device_map:
        return {}
    extra = {"device_map": str(device_map)}
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


def load(resolved: ResolvedModel, dtype: torch.dtype, device: torch.device, cfg: Optional[ModelConfig] = None,
         offline: bool = False):
    """Load the FP model and tokenizer (``cfg``: revision, custom code, placement, pickles); one
    clear line if it is not there, cannot be read, or is not a decoder-only causal LM with a
    trained LM head."""
    from transformers import AutoTokenizer

    cfg = cfg or ModelConfig()
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if offline:
        common["local_files_only"] = True
    _check_config(resolved, common, cfg.allow_pickle)
    model = _load_weights(resolved, dtype, common, cfg)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, **common)
    except Exception as e:
        raise _load_error(resolved, e, "tokenizer", cfg.allow_pickle) from e
    from quantfix.arch import linearize

    linearize(model)  # MoE experts and Conv1D as nn.Linear: one module kind for every stage
    if not cfg.device_map:  # with a device map, accelerate placed every layer already
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def _check_config(resolved: ResolvedModel, common: dict, allow_pickle: bool) -> None:
    """The model's config must name a float, decoder-only model."""
    from transformers import AutoConfig

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


def _load_weights(resolved: ResolvedModel, dtype: torch.dtype, common: dict, cfg: ModelConfig):
    """The model's weights (placed by accelerate when ``cfg.device_map`` is set), checked complete."""
    from transformers import AutoModelForCausalLM

    try:
        extra = placement_kwargs(cfg.device_map, dict(cfg.max_memory) if cfg.max_memory else None,
                                 cfg.offload_folder)
        extra.update(_weights_kwargs(resolved, cfg.allow_pickle))
        model, info = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, output_loading_info=True,
                                                           **common, **extra)
    except QuantfixError:
        raise
    except Exception as e:
        raise _load_error(resolved, e, "weights", cfg.allow_pickle) from e
    check_causal_lm(model, info.get("missing_keys"), resolved.source)
    return model
