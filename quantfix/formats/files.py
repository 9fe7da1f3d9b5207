"""Every read of a checkpoint's files, guarded: a damaged or incomplete file (a safetensors file cut
short, a config.json that is not a JSON object, a shard the index names but the folder lacks) is one
line naming the file and the fix, never a traceback from the reader underneath."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import torch

from quantfix.errors import QuantfixError

REDOWNLOAD = "re-download the checkpoint"


def damaged(f: Path, e: BaseException, what: str = "is damaged or incomplete") -> QuantfixError:
    """One line: the file, what is wrong with it, the reader's own first line, the fix."""
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return QuantfixError(f"{f} {what} ({type(e).__name__}: {msg}): {REDOWNLOAD}")


def read_json(f: Path) -> dict:
    """A JSON object from ``f``; unreadable, not JSON or not an object: one line naming it."""
    try:
        data = json.loads(Path(f).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QuantfixError(f"{f} is not valid JSON ({e.msg}): {REDOWNLOAD}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(f, e, "cannot be read") from e
    if not isinstance(data, dict):
        raise QuantfixError(f"{f} holds a JSON {type(data).__name__}, not an object: {REDOWNLOAD}")
    return data


def quantization_config(root: Path) -> dict:
    """config.json's ``quantization_config`` ({} when there is none)."""
    f = Path(root) / "config.json"
    qc = read_json(f).get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise QuantfixError(f"{f}: quantization_config is a {type(qc).__name__}, not an object: {REDOWNLOAD}")
    return qc


def safetensors_files(root: Path) -> List[Path]:
    """The folder's safetensors files, each header checked (the reader refuses a file cut short),
    and every shard the index names present."""
    from safetensors import safe_open

    root = Path(root)
    for index in sorted(root.glob("*.safetensors.index.json")):
        shards = set((read_json(index).get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (root / str(s)).is_file())
        if missing:
            raise QuantfixError(f"{index} names {len(missing)} shard(s) the folder lacks (e.g. {root / missing[0]}): "
                                f"the download is incomplete; {REDOWNLOAD}")
    files = sorted(root.glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError (a folder, a device): one line
            raise damaged(f, e) from e
    return files


def read_tensors(root: Path, wanted: Callable[[str], bool]) -> Dict[str, torch.Tensor]:
    """The tensors whose names ``wanted`` accepts, from every safetensors file of ``root``."""
    from safetensors import safe_open

    out: Dict[str, torch.Tensor] = {}
    for f in safetensors_files(root):
        try:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    if wanted(k):
                        out[k] = st.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - a tensor whose bytes cannot be read
            raise damaged(f, e) from e
    return out


def open_gguf(path: str):
    """gguf's reader of ``path``; a file it cannot parse is one line naming it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(Path(path).expanduser()))
    except Exception as e:  # noqa: BLE001 - a damaged file raises many types (ValueError, OSError, struct.error)
        raise damaged(Path(path).expanduser(), e, "is not a readable GGUF file (damaged or incomplete)") from e


def require(tensors: Dict[str, torch.Tensor], keys: Iterable[str], root: Path) -> List[torch.Tensor]:
    """``tensors[k]`` for every key; a key the checkpoint lacks is one line naming it."""
    out = []
    for k in keys:
        if k not in tensors:
            raise QuantfixError(f"{root}: tensor {k} is missing from its safetensors files: the checkpoint is "
                                f"incomplete; {REDOWNLOAD}")
        out.append(tensors[k])
    return out
