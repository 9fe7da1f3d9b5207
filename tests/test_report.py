"""The report a person reads: the first screen of a real tiny repair (model, verdict against its
limit, shipped size and ratio, what changed and why), in a real browser when there is one; the
verdict of a failure, evidence in words, probe text, the checkpoint's bytes by part, the cost
table and the iteration plot, on reports built by hand."""
import json
import re
import shutil
import subprocess
import sys
from html import unescape

import pytest
import torch

from quantfix import report as rep
from quantfix.diagnose.findings import Finding
from quantfix.evaluate import Metrics
from quantfix.runreport import Outcome, RunReport, TrialRecord, Verification
from tests.conftest import CONF, ROOT, tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir):
    """A real repair of the tiny Llama: plan 0 at 3 bits per channel fails a KLD limit, the
    diagnosis runs, 8-bit modules make it pass, the checkpoint is exported, reloaded and measured."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfix.config import register
    from quantfix.recipe import run

    register()
    tmp = tmp_path_factory.mktemp("report_run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=tiny_overrides(tiny_dir, tmp / "cache", **{
            "quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
            "thresholds.max_kld_mean": 0.002, "loop.ladder": "[3/0,8/0,16/0]", "loop.bits_step": 2.0,
            "loop.max_iters": 6, "loop.algorithms": "[rtn]", "diagnose.domain_seq_len": 64,
            "probes.max_new_tokens": 8}))
    GlobalHydra.instance().clear()
    out = tmp / "run"
    return run(cfg, out), out


def first_screen(html: str) -> str:
    """The report's text before the findings: what a reader sees first."""
    body = html.split("<body>", 1)[1].split("<h2>", 1)[0]
    return unescape(re.sub(r"<[^>]+>", " ", body)).replace("  ", " ").replace(" :", ":")


def test_first_screen_of_a_real_run(tiny_run, tiny_dir):
    report, out = tiny_run
    assert report.final.passed and report.changes
    html = (out / "report.html").read_text()
    screen = first_screen(html)
    assert f"quantfix report: {tiny_dir.name}" in screen  # the model is named
    kld = report.final.verification.metrics.kld_mean
    assert "PASSED: the reloaded checkpoint's perplexity" in screen
    assert f"mean KLD {kld:.3g} (limit 0.002)" in screen  # the verdict against its limit
    ratio = report.baseline_size_bytes / report.final.size_bytes
    assert f"{report.final.avg_bits:.2f} average bits per weight" in screen and f"{ratio:.2f}x smaller" in screen
    assert "on disk: quantized weights" in screen and "tokenizer" in screen  # the on-disk size explained
    assert "What was changed and why" in screen
    g = report.changes[0]
    assert f"{g.before} → {g.after}" in screen and g.what in screen
    assert "Labels: W3ch: 3-bit integers, one 16-bit scale per output channel" in screen
    # report.json holds the change groups and reads them back
    assert rep.RunReport.load(out).changes == report.changes
    assert json.loads((out / "report.json").read_text())["changes"][0]["after"] == g.after


def test_rest_of_a_real_report(tiny_run):
    _, out = tiny_run
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "Root causes and fixes" in md and "| recommended fix | applied |" in md
    assert "shipped PPL" in md and "not measured" not in md  # the shipped checkpoint's domains and probes
    assert "| domain | prompt | float | plan 0 | shipped |" in md
    assert '{"' not in html.split("</style>", 1)[1]  # no JSON anywhere a reader looks
    assert html.count("data:image/png;base64") >= 4 and "src='/" not in html  # plots embedded: it stands alone
    assert "| stage | seconds | host peak GB | device peak GB | rise |" in md


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (apt-get install chromium)")
def test_first_screen_in_a_browser(tiny_run, tmp_path):
    from PIL import Image

    _, out = tiny_run
    png = tmp_path / "first.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report_screenshot.py"), str(out), "--out", str(png)],
                   check=True, timeout=180)
    im = Image.open(png).convert("RGB")
    assert im.size == (1280, 900)
    colors = im.getcolors(1 << 20)
    assert len(colors) > 50  # text and tables drawn, not a blank page
    assert any(c == (240, 253, 244) for _, c in colors)  # the passed verdict's box is on the first screen


# ---- reports built by hand ----------------------------------------------------------------------

BASE = Metrics(10.0, 2.302585, 0.0, 0.0, 0.0, 1.0, 1000)


def hand_report(ppl: float, kld: float, passed: bool, thresholds: dict) -> RunReport:
    m = Metrics(ppl, 2.38, kld, 10 * kld, 20 * kld, 0.9, 1000)
    trial = TrialRecord(0, "W4g64 x10", "W4g64 x10", "rtn 10", "", 4.25, 6.0, 600_000, m, [] if passed else ["KLD"],
                        1.0)
    fin = Outcome("W4g64 x10", 4.25, 600_000, passed, "loop.max_iters=1 reached without a passing plan", 1, passed, 0,
                  Verification("/nowhere/checkpoint", 700_000, m, [] if passed else ["KLD"]))
    return RunReport(model="org/some-model", config={"thresholds": thresholds, "loop": {"max_iters": 1}},
                     baseline=BASE, baseline_size_bytes=2_000_000, trials=[trial], final=fin,
                     timings_s={"diagnose": 1410.2, "export": 15.9, "total": 1500.0},
                     memory={"host_rss_peak_mb": 10035.3, "stages": {
                         "diagnose": {"host_peak_gb": 9.8, "host_now_gb": 7.4, "host_peak_gb_rise": 6.81},
                         "export": {"host_peak_gb": 9.8, "host_now_gb": 7.2, "host_peak_gb_rise": 0.0}}})


def test_a_failed_verdict_says_which_limit_failed_by_how_much(tmp_path):
    r = hand_report(10.8, 0.02, False, {"max_ppl_increase_pct": 5.0, "max_kld_mean": 0.01})
    rep.write_human(r, tmp_path)
    screen = first_screen((tmp_path / "report.html").read_text())
    assert "FAILED: the reloaded checkpoint's perplexity 10.80 is +8.0% over float's 10.00 (limit +5%: 3.0 points " \
           "over); mean KLD 0.02 (limit 0.01: 2.0x it)" in screen
    assert "quantfix report: org/some-model" in screen
    assert "Labels: W4g64" not in screen  # nothing changed: no legend of changes
    assert "nothing; plan 0 shipped as it was" in screen


def test_a_passed_verdict_names_the_limit(tmp_path):
    r = hand_report(10.47, 0.038, True, {"max_ppl_increase_pct": 5.0})
    rep.write_human(r, tmp_path)
    screen = first_screen((tmp_path / "report.html").read_text())
    assert "PASSED: the reloaded checkpoint's perplexity 10.47 is +4.7% over float's 10.00 (limit +5%); " \
           "mean KLD 0.038" in screen
    assert "2 MB in float (16-bit), 3.33x smaller" in screen


def test_a_gguf_verdict_is_llama_perplexitys(tmp_path):
    """GGUF mode: the verdict quotes llama-perplexity's numbers, the shipped file is the GGUF with
    quantfix's predicted KLD beside it, and the console's last row says who measured it."""
    r = hand_report(10.47, 0.038, True, {"max_ppl_increase_pct": 5.0})
    v = r.final.verification
    v.checkpoint, v.format, v.predicted_kld = "/runs/x/gguf/model.gguf", "gguf", 0.0371
    rep.write_human(r, tmp_path)
    screen = first_screen((tmp_path / "report.html").read_text())
    assert "PASSED: by llama-perplexity, the GGUF's perplexity 10.47 is +4.7% over float's 10.00" in screen
    assert "The GGUF gguf/model.gguf (llama-quantize, quantfix's imatrix) holds 0.7 MB on disk; quantfix predicted " \
           "KLD 0.0371." in screen
    assert rep.table(r).splitlines()[-1].startswith("gguf  llama-perplexity")


def test_time_and_memory_as_one_small_table(tmp_path):
    rep.write_human(hand_report(10.1, 0.01, True, {}), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| diagnose | 1410 | 9.80 | - | host +6.81 GB |" in md
    assert "| export | 16 | 9.80 | - | - |" in md
    assert "| whole run | 1500 | 9.80 | - |  |" in md
    assert "host_peak_gb" not in md  # no dict dumped


@pytest.mark.parametrize("finding, words", [
    (Finding("outlier_channels", "", "", {"channel": 1229, "value": 3220.8, "median": 1.79, "ratio": 1797.6,
                                          "n_outliers": 8, "sensitivity_share": 0.1009}),
     "channel 1229: max |x| 3,221 vs median 1.79 (1,798x); 8 outlier channels; 10.1% of the sensitivity"),
    (Finding("outlier_channels", "", "", {"channel": 507, "ratio": 40.8, "layers": [1, 2, 8, 29],
                                          "sensitivity_share": 0.0692, "per_input": [{"a": 1}, {"b": 2}]}),
     "channel 507 reaches up to 40.8x the median in 2 inputs (layers 1-2, 8, 29); 6.9% of the sensitivity"),
    (Finding("outlier_channels", "", "", {"ratio": 24.0,
                                          "findings": ["outlier channel 175 feeds model.layers.0.self_attn.o_proj"]}),
     "outlier channel 175 feeds layer 0 o_proj"),
    (Finding("spread_evenly", "", "", {"share": 0.314}), "the top 10% of layers hold 31% of the layer sensitivity"),
    (Finding("domain_gap", "", "", {"prose": 46.25, "code": 34.45}), "PPL increase: prose +46.2%, code +34.5%"),
    (Finding("calibration_mismatch", "", "", {"kld": 0.05, "rtn_kld": 0.04, "algorithms": ["gptq"],
                                              "per_domain_ppl_increase": {"prose": 3.1}}),
     "kld 0.05; rtn kld 0.04; algorithms: 1 items; per domain ppl increase: prose 3.1"),
])
def test_evidence_is_words_not_json(finding, words):
    text = rep.evidence_words(finding)
    assert text == words and "{" not in text


def test_probe_text_keeps_its_newlines_and_is_not_marked_up(tmp_path):
    blocks = [("table", ["float"], [[rep.Pre("def f():\n    return **x**")]])]
    html = rep.render_html(blocks, tmp_path)
    assert "<td class='pre'>def f():\n    return **x**</td>" in html and "white-space:pre-wrap" in html
    assert "| def f():<br>    return **x** |" in rep.render_markdown(blocks, tmp_path)


def test_checkpoint_bytes_by_part(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    save_file({"m.weight_packed": torch.zeros(4, 2, dtype=torch.int32), "m.weight_scale": torch.zeros(4, 1).half(),
               "m.weight_shape": torch.tensor([4, 16]), "embed.weight": torch.zeros(10, 4).half()},
              str(ckpt / "model.safetensors"))
    (ckpt / "tokenizer.json").write_text("x" * 100)
    (ckpt / "config.json").write_text("y" * 50)
    parts = rep.checkpoint_parts(ckpt)
    assert parts["quantized weights"] == 32 and parts["scales and zero points"] == 8
    assert parts["float tensors"] == 80 and parts["tokenizer"] == 100 and parts["config, plan and recipe"] == 50
    assert parts["format overhead"] > 16  # the shape record and the header
    assert sum(parts.values()) == sum(f.stat().st_size for f in ckpt.iterdir())


def test_iteration_plot_keeps_to_the_measured_range(tmp_path, monkeypatch):
    """The predicted curve reaches 16 bits; the plot shows the measured bits with a margin, and the
    trial numbers of two plans 0.02 bits apart do not print over each other."""
    import matplotlib.figure

    r = hand_report(10.8, 0.02, False, {"max_kld_mean": 0.01})
    for i, (bits, kld) in enumerate(((5.38, 0.0100), (5.40, 0.0099)), start=1):
        m = Metrics(10.3, 2.33, kld, 0.1, 0.2, 0.9, 1000)
        r.trials.append(TrialRecord(i, "W5g64 x10", "W5g64 x10", "rtn 10", "", bits, 7.0, 700_000, m, [], 1.0))
    r.pareto = {"predicted": [[4.25, 0.4], [5.0, 0.05], [5.5, 0.03], [8.0, 0.005], [16.0, 0.0]]}
    seen = {}
    real = matplotlib.figure.Figure.savefig

    def save(fig, *a, **k):
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        seen.update(xlim=ax.get_xlim(), lines={line.get_label(): list(line.get_xdata()) for line in ax.get_lines()},
                    boxes=[t.get_window_extent(renderer) for t in ax.texts if t.get_text() in ("0", "1", "2")])
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    assert rep.plot_iterations(r, tmp_path).exists()
    lo, hi = seen["xlim"]
    assert 3.9 <= lo < 4.25 and 5.40 < hi <= 5.7
    assert max(seen["lines"]["predicted by the diagnosis"]) <= hi
    boxes = seen["boxes"]
    assert len(boxes) == 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_probe_counts_in_words():
    gens = [{"first_divergence": 3, "new_loop": True, "new_refusal": False},
            {"first_divergence": None, "new_loop": False, "new_refusal": False}]
    assert rep._probe_counts("Shipped", gens) == ("Shipped: 1 of 2 probes differ from the float model's greedy text, "
                                                 "1 new repetition loop, 0 new refusals.")
    assert rep._probe_counts("Plan 0", []) == ""
