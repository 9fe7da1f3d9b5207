"""GPTQ- and AWQ-format checkpoints (AutoGPTQ, GPTQModel, AutoRound, AutoAWQ): int32-packed
integers, fp16 scales and packed zero points per module, read straight from the safetensors files.

transformers loads these formats only through gptqmodel / autoawq kernels; quantfix needs the
integers themselves (the scheme of every module and a bit-exact compressed-tensors grid), so it
unpacks them here. The layouts, checked against AutoRound's own writer and dequantizers in
tests/test_formats.py:

- GPTQ: ``qweight`` [in * bits / 32, out], 32 / bits values per int32 along the input dimension,
  low bits first; ``qzeros`` [groups, out * bits / 32] packed the same way along the output
  dimension; ``scales`` [groups, out]; ``g_idx`` [in] (the group of each input; act-order when it
  is not ``i // group``). The original (v1) format stores zero - 1 (``checkpoint_format`` gptq),
  GPTQModel's v2 the zero itself. W[o, i] = scale[g, o] * (q[i, o] - zero[g, o]).
- AWQ (GEMM): ``qweight`` [in, out * bits / 32] and ``qzeros`` [groups, out * bits / 32], packed
  along the output dimension in the interleaved order 0 2 4 6 1 3 5 7; ``scales`` [groups, out].
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from quantfix.errors import QuantfixError
from quantfix.formats import files, parent
from quantfix.formats.common import External, check_group, grid_precision
from quantfix.plan import Plan, Precision

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the position of the k-th packed nibble of a block of 8 outputs


def _tensors(path: Path, wanted_suffixes=(".qweight", ".qzeros", ".scales", ".g_idx")) -> Dict[str, torch.Tensor]:
    if not sorted(path.glob("*.safetensors")):
        raise QuantfixError(f"{path}: no .safetensors files; quantfix reads GPTQ/AWQ checkpoints in safetensors")
    return files.read_tensors(path, lambda k: k.endswith(wanted_suffixes))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] holding 32 / bits values per element along dim 0 -> int [r * 32 / bits, c]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    v = torch.bitwise_right_shift(packed[:, None, :], shifts[None, :, None]) & (2 ** bits - 1)
    return v.reshape(packed.shape[0] * per, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] holding 32 / bits values per element along dim 1 -> int [r, c * 32 / bits]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    v = torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]) & (2 ** bits - 1)
    return v.reshape(packed.shape[0], packed.shape[1] * per)


def gptq_ints(qweight, qzeros, bits: int, v1: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q [in, out], zero [groups, out]) of a GPTQ module, unsigned."""
    if 32 % bits:
        raise QuantfixError(f"GPTQ {bits}-bit packing (values across int32 words) is not supported: use 2, 4 or 8 bits")
    q = unpack_rows(qweight, bits)
    z = unpack_cols(qzeros, bits)
    if v1:  # stored zero - 1; read as the v1 kernels do (stored + 1, a stored -1 reading as 2^bits)
        z = z + 1
    return q, z


def awq_ints(qweight, qzeros, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q [in, out], zero [groups, out]) of an AWQ GEMM module, unsigned."""
    if bits != 4:
        raise QuantfixError(f"AWQ {bits}-bit GEMM packing is not supported: AWQ checkpoints are 4-bit")
    order = torch.tensor(AWQ_ORDER)
    inv = torch.argsort(order)  # packed slot k holds output block position order[k]

    def unpack(t):
        v = unpack_cols(t, bits).reshape(t.shape[0], -1, 8)
        return v[:, :, inv].reshape(t.shape[0], -1)
    return unpack(qweight), unpack(qzeros)


def _check_layout(name: str, q, z, sc, g_idx, shape: Tuple[int, int], path: str) -> None:
    """Unpacked integers, zero points, scales and group indices that fit one [out, in] module."""
    out_f, in_f = shape
    n_groups = sc.shape[0]
    fits = tuple(q.shape) == (in_f, out_f) and z.shape[0] == n_groups and z.shape[1] >= out_f and \
        (g_idx is None or (g_idx.numel() == in_f and 0 <= int(g_idx.min()) and int(g_idx.max()) < n_groups))
    if not fits:
        raise QuantfixError(f"{path}: the packed tensors of {name} do not fit one {out_f}x{in_f} module (integers "
                            f"{tuple(q.shape)}, zero points {tuple(z.shape)}, scales {tuple(sc.shape)}"
                            f"{'' if g_idx is None else f', g_idx {tuple(g_idx.shape)}'}): the checkpoint is damaged; "
                            f"{files.REDOWNLOAD}")


def read(path: str, plan0: Plan, fmt: str, model_fp=None) -> External:
    root = Path(path).expanduser()
    qc = files.quantization_config(root)
    if fmt == "gptq" and (root / "quantize_config.json").exists() and not qc:
        qc = files.read_json(root / "quantize_config.json")
    if fmt == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise QuantfixError(f"{path}: AWQ version {qc.get('version')!r}; quantfix reads the GEMM layout (the default)")
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    v1 = str(qc.get("checkpoint_format") or meta.get("checkpoint_format") or "gptq") != "gptq_v2"
    t = _tensors(root)
    modules, weights, qps, types, notes = {}, {}, {}, {}, []
    found = 0
    for name in plan0.modules:
        out_f, in_f = plan0.shapes[name]
        if f"{name}.qweight" not in t:
            modules[name] = Precision(16)
            continue
        found += 1
        qweight, qzeros, sc = files.require(t, (f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"), root)
        if sc.shape[-1] != out_f:
            raise QuantfixError(f"{path}: {name}.scales has shape {tuple(sc.shape)}, but the float model's module is "
                                f"{out_f}x{in_f}: model.name_or_path must be this checkpoint's float parent")
        n_groups = sc.shape[0]
        if fmt == "gptq":
            bits = qweight.shape[0] * 32 // in_f
            if bits not in (2, 4, 8) or qweight.shape[0] * 32 != bits * in_f:
                raise QuantfixError(f"{path}: {name}.qweight has shape {tuple(qweight.shape)}: not a 2/4/8-bit GPTQ "
                                    f"packing of {in_f} inputs")
            q, z = gptq_ints(qweight, qzeros, bits, v1)
        else:
            bits = int(qc.get("bits") or qc.get("w_bit") or 4)
            q, z = awq_ints(qweight, qzeros, bits)
        g_idx = t.get(f"{name}.g_idx")
        _check_layout(name, q, z, sc, g_idx, (out_f, in_f), path)
        z = z[:, :out_f]
        group = in_f // n_groups if n_groups > 1 else 0
        trivial = torch.arange(in_f) // (group or in_f)
        act_order = g_idx is not None and not torch.equal(g_idx.long(), trivial)
        gi = g_idx.long() if act_order else trivial
        scale = sc.float()
        W = (scale[gi] * (q.float() - z[gi].float())).T.contiguous()  # [out, in]
        sym = bool((z == 2 ** (bits - 1)).all())
        group = check_group(group, in_f, name, path)
        native = None if act_order else (scale.T.contiguous(), (z.float() - 2 ** (bits - 1)).T.contiguous())
        prec, qp = grid_precision(W, bits, group, sym, native)
        if act_order:
            notes.append(f"{name}: act-order groups (g_idx) have no contiguous-group grid; exported re-rounded")
        modules[name], weights[name], qps[name] = prec, W, qp
        types[name] = f"{fmt} W{bits}g{group or 'ch'}{'' if sym else 'a'}"
    if not found:
        raise QuantfixError(f"{path}: no packed module (.qweight) matches the float model's planned modules (e.g. "
                            f"{next(iter(plan0.modules))}): model.name_or_path must be this checkpoint's float parent")
    smoothed = parent.smoothing_note(files.read_tensors(root, lambda k: k.endswith(("norm.weight", ".bias"))), model_fp)
    plan = plan0.with_changes(modules, note=f"existing {fmt} checkpoint {path}")
    return External(plan, weights, qps, fmt, types, notes=notes + ([smoothed] if smoothed else []))
