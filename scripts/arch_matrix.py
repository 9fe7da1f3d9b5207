"""The architecture matrix of issue 14: for each tiny random model (tests/tiny_archs.py) run
mode=diagnose and the full repair loop (export + reload + verify) on the CPU, and print/write a
table: diagnose / loop / reload / modules quantized (count and share of the model's matmul weights:
Linear, Conv1D and 3-D expert parameters, lm_head excluded).

    python scripts/arch_matrix.py --out benchmarks/arch_matrix_after.json [--archs llama gpt2]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import CONF, tiny_overrides, tiny_tokenizer  # noqa: E402
from tests.tiny_archs import ARCHS, save_tiny, tiny_model  # noqa: E402

FAST = {"quant.group_size": 32, "loop.max_iters": 2, "loop.algorithms": "[rtn,gptq_imatrix]",
        "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.01, "eval.n_windows": 2,
        "diagnose.domains": "{}", "offline": "true", "threads": 1}


def matmul_weights(model):
    """(name, numel) of every matmul weight: Linear/Conv1D weights and 3-D expert parameters, lm_head out."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    out = []
    for name, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            out.append((f"{name}.weight", mod.weight.numel()))
        for pname, p in mod.named_parameters(recurse=False):
            if p.ndim == 3:
                out.append((f"{name}.{pname}", p.numel()))
    return out


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfix.config import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {(text[0] if text else '')[:160]}"


def one(arch: str, tok, work: Path) -> dict:
    from quantfix.errors import QuantfixError
    from quantfix.recipe import run
    from quantfix.plan import Plan

    model_dir = save_tiny(arch, tok, work / f"model_{arch}")
    total = sum(n for _, n in matmul_weights(tiny_model(arch)))
    row = {"arch": arch, "matmul_params": total}
    t0 = time.perf_counter()
    try:
        run(_compose(tiny_overrides(model_dir, work / "cache", mode="diagnose", **FAST)), work / f"diag_{arch}")
        row["diagnose"] = "ok"
    except QuantfixError as e:
        row["diagnose"] = "refused: " + _err(e)
    except Exception as e:
        row["diagnose"] = "crash: " + _err(e)
    row["diagnose_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    out = work / f"loop_{arch}"
    try:
        report = run(_compose(tiny_overrides(model_dir, work / "cache", **FAST)), out)
        fin = report["final"]
        row["loop"] = "ok"
        row["passed"] = fin.get("passed")
        row["verified_failed"] = fin.get("verified_failed")
        row["export_gap_pct"] = fin.get("export_gap_pct")
        row["verified_kld"] = (fin.get("verified_metrics") or {}).get("kld_mean")
        plan = Plan.load(out / "plan.yaml")
        row["modules_quantized"] = sum(1 for p in plan.modules.values() if not p.is_float)
        row["modules_planned"] = len(plan.modules)
        row["planned_params"] = plan.n_params
        row["coverage_pct"] = round(100 * plan.n_params / max(total, 1), 1)
        fails = fin.get("verified_failed") or []
        load = [f for f in fails if f.startswith("checkpoint weights")]
        row["reload"] = "ok" if (out / "checkpoint").exists() and not load else ("keys: " + "; ".join(load)
                                                                                   if load else "no checkpoint")
    except QuantfixError as e:
        row["loop"] = "refused: " + _err(e)
    except Exception as e:
        row["loop"] = "crash: " + _err(e)
        row["traceback"] = traceback.format_exc(limit=-14)
    row["loop_s"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows) -> str:
    lines = ["| arch | diagnose | loop | reload | modules quantized (share of matmul weights) | export gap % | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mods = f"{r['modules_quantized']}/{r['modules_planned']} ({r['coverage_pct']}%)" if "modules_planned" in r else "-"
        lines.append(f"| {r['arch']} | {r['diagnose'][:70]} | {r['loop'][:90]} | {r.get('reload', '-')[:80]} | {mods} | "
                     f"{r.get('export_gap_pct', '-')} | {r['diagnose_s'] + r['loop_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="*", default=list(ARCHS) + ["qwen2_moe"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tok = tiny_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="arch-matrix-") as tmp:
        for arch in args.archs:
            rows.append(one(arch, tok, Path(tmp)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "traceback"}), flush=True)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"label": args.label, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
