"""quantfix's GGUF against llama.cpp's presets at matched file size, KLD measured by llama-perplexity.

For one model (a GGUF file, dequantized once as the float parent, or ``demo``):
  1. the F16 parent, the eval text (WikiText-2 test) and llama-perplexity's saved F16 log-probs on
     ``--chunks`` chunks of ``--ctx`` tokens (the same files quantfix's own run uses: cached by content);
  2. each preset (Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M) without an imatrix: its file size, and the
     bits per weight of its matrices (every 2-D tensor: what quantfix plans), which is quantfix's
     budget (``plan.budget.avg_bits``): norms and metadata are the same bytes in both files;
  3. quantfix at each budget (``python -m quantfix ... export.format=gguf``: its GGUF, verified by
     llama-perplexity on the same chunks), starting from Q2_K (quant.bits=2);
  4. each preset again with quantfix's imatrix (written by the first quantfix run from its
     calibration statistics; bit for bit what llama-imatrix computes on the same tokens);
  5. with ``--autoround P ...``: AutoRound's own GGUF export of the float model (``format=gguf:<p>``,
     ``--autoround-iters``, default 0: its optimized RTN), calibrated on the same C4 windows (its GGUF
     converter needs ``pip install sentencepiece``);
and writes JSON, a markdown table and a plot (KLD against file size) into ``--out``.

    python scripts/bench_gguf.py --model demo --name smollm2-135m --chunks 6
    python scripts/bench_gguf.py --model /tmp/g/gemma-3-270m-q4_k_m.gguf --name gemma3-270m --chunks 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantfix import cache as cache_mod, data, gguf_export, source  # noqa: E402
from quantfix.llamacpp import run, tools  # noqa: E402
from quantfix.plotting import figure  # noqa: E402

PRESETS = ("Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")


def matrices_bits(path: Path) -> dict:
    """File bytes, and bits per weight of its 2-D tensors as stored."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    mats = [t for t in r.tensors if len(t.shape) == 2]
    nbytes = sum(int(t.n_bytes) for t in mats)
    params = sum(int(t.n_elements) for t in mats)
    return {"file_bytes": path.stat().st_size, "matrix_bytes": nbytes, "matrix_params": params,
            "bpw": 8 * nbytes / params}


def _done(out: Path):
    """The row measured before (``<out>.row.json``, written when a row completes): a rerun after an
    interruption measures only what is missing."""
    f = out.with_name(out.name + ".row.json")
    return json.loads(f.read_text()) if f.is_file() else None


def _keep(out: Path, row: dict) -> dict:
    out.with_name(out.name + ".row.json").write_text(json.dumps(row))
    print(json.dumps({k: v for k, v in row.items() if k != "timings_s"}), flush=True)
    return row


def preset(f16: Path, name: str, out: Path, base: Path, imatrix) -> dict:
    if _done(out):
        return _done(out)
    t = time.perf_counter()
    path, _ = run.quantize(f16, out, name, imatrix=imatrix)
    tq = time.perf_counter() - t
    r = run.kld(path, base)
    row = {"method": f"llama.cpp {name}" + (" + imatrix" if imatrix else ""), "preset": name,
           "imatrix": bool(imatrix), **matrices_bits(path), "kld": r["kld_mean"], "kld_err": r.get("kld_mean_err"),
           "ppl": r["ppl"], "ppl_base": r["ppl_base"], "same_top_p": r["same_top_p"], "n_tokens": r["n_tokens"],
           "seconds_quantize": round(tq, 1), "seconds": round(time.perf_counter() - t, 1)}
    return _keep(out, row)


def quantfix_run(args, budget: float, run_dir: Path) -> dict:
    if _done(run_dir):
        return _done(run_dir)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "quantfix", f"model.name_or_path={args.model}", "export.format=gguf",
           f"plan.budget.avg_bits={budget:.5f}", "quant.bits=2", f"eval.n_windows={args.chunks}",
           f"eval.seq_len={args.ctx}", f"hydra.run.dir={run_dir}", "loop.max_iters=2", "diagnose.probes=false",
           "diagnose.domain_windows=1", "diagnose.domain_seq_len=128", f"data.n_samples={args.samples}",
           "data.seq_len=512", "thresholds.max_ppl_increase_pct=100"] + args.extra
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (run_dir / "bench.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.log").write_text(p.stdout + p.stderr)
    rep = json.loads((run_dir / "report.json").read_text())
    fin = rep["final"]
    r = fin.get("llama_perplexity") or {}
    path = Path(fin["checkpoint"])
    row = {"method": "quantfix", "budget_bpw": round(budget, 4), **matrices_bits(path), "kld": r.get("kld_mean"),
           "kld_err": r.get("kld_mean_err"), "ppl": r.get("ppl"), "ppl_base": r.get("ppl_base"),
           "same_top_p": r.get("same_top_p"), "n_tokens": r.get("n_tokens"), "predicted_kld": fin.get("predicted_kld"),
           "prediction_error_pct": None, "plan": fin.get("plan_summary"), "rc": p.returncode,
           "seconds": round(time.perf_counter() - t, 1), "timings_s": rep.get("timings_s"), "run_dir": str(run_dir)}
    if row["kld"] and row["predicted_kld"]:
        row["prediction_error_pct"] = round(100 * (row["predicted_kld"] / row["kld"] - 1), 2)
    return _keep(run_dir, row)


AUTOROUND = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound
model_dir, fmt, iters, data_file, n, seqlen, out = sys.argv[1:8]
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ar = AutoRound(model, tok, scheme=fmt, iters=int(iters), dataset=data_file, nsamples=int(n), seqlen=int(seqlen),
               device_map="cpu")
ar.quantize_and_save(out, format=fmt)
"""


def autoround_row(args, preset: str, iters: int, model_dir: str, base: Path, work: Path) -> dict:
    """AutoRound's own GGUF export (``format=gguf:<preset>``) of the float model, calibrated on the
    same C4 windows quantfix calibrates on, measured by llama-perplexity on the same chunks."""
    out = work / f"autoround-{preset}-iters{iters}"
    if _done(out):
        return _done(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = data.calibration_samples(["c4"], str(data.default_data_dir()), tok, args.samples, 512, 0)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / "calib.jsonl"
    data_file.write_text("\n".join(json.dumps({"text": tok.decode(x)}) for x in samples))
    t = time.perf_counter()
    fmt = f"gguf:{preset.lower()}"
    # AutoRound's bundled converter fails on Gemma-3: LLAMA_CPP_ROOT points it at the pinned llama.cpp
    # source quantfix built its tools from (convert_hf_to_gguf.py, conversion/), with its own gguf-py
    # first on the path (the converter names architectures the PyPI gguf package does not have yet)
    root = os.environ.get("LLAMA_CPP_ROOT", str(tools.source_dir()))
    env = dict(os.environ, LLAMA_CPP_ROOT=root,
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(root) / "gguf-py"), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-c", AUTOROUND, model_dir, fmt, str(iters), str(data_file),
                        str(len(samples)), "512", str(out)], capture_output=True, text=True, env=env)
    (out / "autoround.log").write_text(p.stdout + p.stderr)
    secs = time.perf_counter() - t
    files = sorted(out.rglob("*.gguf"))
    label = f"AutoRound {fmt} (iters={iters})"
    if p.returncode != 0 or not files:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": label, "preset": preset, "error": tail[0][-300:], "seconds": round(secs, 1)}
    r = run.kld(files[0], base)
    row = {"method": label, "preset": preset, "imatrix": False, "autoround": True, **matrices_bits(files[0]),
           "kld": r["kld_mean"], "kld_err": r.get("kld_mean_err"), "ppl": r["ppl"], "ppl_base": r["ppl_base"],
           "same_top_p": r["same_top_p"], "n_tokens": r["n_tokens"], "seconds_quantize": round(secs, 1),
           "seconds": round(time.perf_counter() - t, 1)}
    return _keep(out, row)


def table(rows) -> str:
    out = ["| method | file MB | matrices bpw | KLD (llama-perplexity) | PPL | same top | predicted KLD | seconds |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['method']} | | | failed: {r['error']} | | | | {r['seconds']:.0f} |")
            continue
        pred = f"{r['predicted_kld']:.5f} ({r['prediction_error_pct']:+.1f}%)" if r.get("predicted_kld") else ""
        out.append(f"| {r['method']}{' @' + r['target'] if r.get('target') else ''} | {r['file_bytes'] / 1e6:.2f} | "
                   f"{r['bpw']:.3f} | {r['kld']:.5f} | {r['ppl']:.3f} | {r['same_top_p']:.3f} | {pred} | "
                   f"{r['seconds']:.0f} |")
    return "\n".join(out)


def plot(rows, path: Path, title: str) -> None:
    with figure(path, figsize=(7, 4.5)) as (fig, ax):
        for label, sel, style in (("llama.cpp presets", lambda r: not r.get("imatrix") and r["method"] != "quantfix"
                                   and not r.get("autoround"), "s--"),
                                  ("llama.cpp presets + imatrix", lambda r: r.get("imatrix"), "^--"),
                                  ("AutoRound GGUF", lambda r: r.get("autoround"), "dk:"),
                                  ("quantfix", lambda r: r["method"] == "quantfix", "o-")):
            pts = sorted((r["file_bytes"] / 1e6, r["kld"]) for r in rows if sel(r) and r.get("kld"))
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("KLD vs F16 (llama-perplexity)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()


def write(args, rows, t0) -> None:
    """The JSON, the markdown table and the plot of the rows so far (rewritten after every row)."""
    result = {"model": args.model, "name": args.name, "chunks": args.chunks, "ctx": args.ctx,
              "scored_tokens": rows[0]["n_tokens"], "text": "WikiText-2 test (first chunks)",
              "machine": "2 CPU cores shared with other jobs, no GPU", "date": time.strftime("%Y-%m-%d"),
              "seconds_total": round(time.perf_counter() - t0, 1), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gguf_{args.name}_cpu.json").write_text(json.dumps(result, indent=1))
    (args.out / f"gguf_{args.name}_cpu.md").write_text(table(rows) + "\n")
    plot(rows, args.out / f"gguf_{args.name}_cpu.png", f"{args.name}: KLD at file size ({args.chunks} x {args.ctx} tokens)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--name", default="smollm2-135m")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--quantfix", nargs="*", help="the presets whose size quantfix runs at (default: all)")
    ap.add_argument("--autoround", nargs="*", default=[], help="presets AutoRound exports itself (gguf:<preset>)")
    ap.add_argument("--autoround-iters", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gguf"))
    ap.add_argument("extra", nargs="*", help="more quantfix overrides")
    args = ap.parse_args()
    cache = cache_mod.cache_dir()
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    resolved = source.resolve(args.model, cache)
    key = cache_mod.model_fingerprint(resolved.path)[:20]
    f16 = gguf_export.float_parent(args.model, resolved.path, cache, key, False)
    text = gguf_export.eval_text(data.load_text("wikitext2", str(data.default_data_dir()), False),
                                 max(args.chunks, 2) * args.ctx, cache)
    base = gguf_export.saved_base(f16, text, args.ctx, args.chunks, cache)
    rows, t0 = [], time.perf_counter()
    plain = {p: preset(f16, p, work / f"{p}.gguf", base, None) for p in args.presets}
    rows += plain.values()
    # quantfix at the first preset's size (its run writes the imatrix), the presets with that
    # imatrix, then quantfix at the other sizes (--quantfix limits which: they cost the most)
    todo = [p for p in args.presets if p in (args.quantfix or args.presets)]
    im = None
    for i, p in enumerate(todo):
        r = plain[p]
        q = quantfix_run(args, r["bpw"], work / f"quantfix-{p}")
        q["target"] = p
        q["size_vs_preset_pct"] = round(100 * (q["file_bytes"] / r["file_bytes"] - 1), 2)
        rows.append(q)
        write(args, rows, t0)
        if i == 0:
            im = Path(q["run_dir"]) / "gguf" / "imatrix.gguf"
            for pi in args.presets:
                rows.append(preset(f16, pi, work / f"{pi}-imatrix.gguf", base, im))
                write(args, rows, t0)
    for p in args.autoround:  # AutoRound's GGUF, then quantfix at its bits per matrix weight
        ar = autoround_row(args, p, args.autoround_iters, resolved.path, base, work)
        rows.append(ar)
        write(args, rows, t0)
        if not ar.get("error"):
            q = quantfix_run(args, ar["bpw"], work / f"quantfix-autoround-{p}")
            q["target"] = f"AutoRound gguf:{p.lower()}"
            q["size_vs_preset_pct"] = round(100 * (q["file_bytes"] / ar["file_bytes"] - 1), 2)
            rows.append(q)
            write(args, rows, t0)
    print(table(rows))


if __name__ == "__main__":
    main()
