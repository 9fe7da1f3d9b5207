"""The diagnosis (``quantfix.diagnose``) on planted faults: a function-preserving rescale the float
model does not notice but quantization does must come out as the most sensitive layer, its channel
as an outlier, and the repair must protect that module; an existing checkpoint diagnosed; the
options scored in several passes; the sensitivity cache keyed by the plan's weights, not its labels."""
import json

import pytest
import torch

from quantfix.diagnose.findings import Diagnosis
from quantfix.plan import Plan
from tests.conftest import run_report as run
from tests.conftest import CHANNEL, LAYER, base_model, planted, save_model_dir, tiny_overrides

DIAG = {"mode": "diagnose", "diagnose.probes": "false", "diagnose.domain_seq_len": 64}


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, tokenizer):
    return save_model_dir(planted(), tokenizer, tmp_path_factory.mktemp("planted"))


def test_rescale_preserves_the_float_function():
    x = torch.randint(0, 384, (2, 32))
    with torch.no_grad():
        a = base_model()(x).logits
        b = planted()(x).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_diagnose_finds_the_planted_layer_channel_and_fix(compose, planted_dir, tmp_path):
    cfg = compose(tiny_overrides(planted_dir, tmp_path / "cache", **{
        "mode": "diagnose", "quant.group_size": 16, "diagnose.domain_seq_len": 64, "probes.max_new_tokens": 8,
        "diagnose.sensitivity.windows": 4}))
    out = tmp_path / "run"
    report = run(cfg, out)
    diag = json.loads((out / "diagnosis.json").read_text())
    layers = {int(k): v for k, v in diag["sensitivity"]["layers"].items()}
    assert max(layers, key=layers.get) == LAYER
    # the planted channel is the top outlier of the input q/k/v read
    q_input = next(o for o in diag["outliers"] if f"model.layers.{LAYER}.self_attn.q_proj" in o["input_of"])
    assert q_input["float"]["top"][0][0] == CHANNEL and q_input["float"]["n_outliers"] >= 1
    assert q_input["float"]["ratio"] > 6
    assert diag["outliers"][0]["input_of"] == q_input["input_of"]  # the planted input has the largest ratio
    full = json.loads((out / "diagnosis_full.json").read_text())
    assert full.pop("fingerprint")  # of the run's inputs, for loop.resume
    assert Diagnosis.from_dict(full).to_dict() == full  # the typed diagnosis round-trips
    kinds = {f["kind"] for f in diag["findings"]}
    outl = [f for f in diag["findings"] if f["kind"] == "outlier_channels"]
    assert outl and any(f"layers.{LAYER}.self_attn" in m for f in outl for m in f["modules"])
    assert outl[0]["evidence"]["channel"] == CHANNEL
    assert "concentrated_layers" in kinds
    conc = next(f for f in diag["findings"] if f["kind"] == "concentrated_layers")
    assert LAYER in conc["layers"]
    # human-readable report and plots
    md = (out / "report.md").read_text()
    assert "Root causes and fixes" in md and f"outlier activation channel {CHANNEL}" in md
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 3
    assert any(p.name.startswith("act_hist_") for p in (out / "plots").iterdir())
    assert report["final"] is None and not (out / "checkpoint").exists()


def test_float_side_absmax_comes_from_the_calibration_pass(compose, planted_dir, tmp_path, monkeypatch):
    """Where the sensitivity passes share no windows (Fisher on 1, Taylor on 2, in batches of 2), the
    float model's input absmax over the first calibration samples is read from the calibration pass
    (one absmax pass left: the quantized side's), and the outliers are those the diagnosis measured
    with its own float pass. Where they share them (2 and 2), both sides come from those passes: none."""
    from quantfix.calib import CalibStats
    from quantfix.diagnose import activations

    calls = []
    real = activations.input_absmax
    monkeypatch.setattr(activations, "input_absmax", lambda m, s, names, *a, **k: calls.append(len(names)) or
                        real(m, s, names, *a, **k))
    over = {"mode": "diagnose", "quant.group_size": 16, "diagnose.domain_seq_len": 64, "diagnose.probes": False,
            "diagnose.sensitivity.windows": 2, "diagnose.histograms": 0}
    run(compose(tiny_overrides(planted_dir, tmp_path / "cache", **over, **{"diagnose.sensitivity.fisher_windows": 2})),
        tmp_path / "shared")
    assert calls == []
    shared = json.loads((tmp_path / "shared" / "diagnosis.json").read_text())["outliers"]
    assert shared[0]["float"]["top"][0][0] == CHANNEL and shared[0]["quantized"] is not None
    from quantfix.diagnose import sensitivity

    with monkeypatch.context() as m:  # the sensitivity from its cache entry, the absmax with it
        m.setattr(sensitivity, "taylor", lambda *a, **k: pytest.fail("the sensitivity was not read from the cache"))
        run(compose(tiny_overrides(planted_dir, tmp_path / "cache", **over, **{"diagnose.sensitivity.fisher_windows": 2})),
            tmp_path / "warm")
    assert calls == [] and json.loads((tmp_path / "warm" / "diagnosis.json").read_text())["outliers"] == shared
    over["diagnose.sensitivity.fisher_windows"] = 1
    run(compose(tiny_overrides(planted_dir, tmp_path / "cache", **over)), tmp_path / "a")
    assert len(calls) == 1  # the quantized side only
    calls.clear()
    monkeypatch.setattr(CalibStats, "head_absmax", lambda self, names, samples: {})
    run(compose(tiny_overrides(planted_dir, tmp_path / "cache", **over)), tmp_path / "b")
    assert len(calls) == 2 and calls[0] == calls[1]  # without it: a float pass over every module
    a, b = (json.loads((tmp_path / d / "diagnosis.json").read_text())["outliers"] for d in "ab")
    assert a == b and a[0]["float"]["top"][0][0] == CHANNEL


def test_repair_protects_the_planted_module(compose, planted_dir, tmp_path):
    cfg = compose(tiny_overrides(planted_dir, tmp_path / "cache", **{
        "quant.group_size": 16, "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.01,
        "diagnose.domain_seq_len": 64, "probes.max_new_tokens": 4, "loop.max_iters": 5,
        "loop.ladder": "[4/16,8/0,16/0]", "diagnose.domains.prose": "pydoc", "diagnose.domain_windows": 2}))
    out = tmp_path / "run"
    report = run(cfg, out)
    assert not report["iterations"][0]["passed"]
    assert report["final"]["passed"], report["final"]
    # the domain whose text is the eval's (pydoc) is the eval itself: plan 0's trial, then the shipped one's
    domains, trial0 = json.loads((out / "diagnosis.json").read_text())["domains"], report["iterations"][0]["metrics"]
    assert list(domains) == ["prose", "web", "code"]
    assert domains["prose"]["windows"] == "eval" and "windows" not in domains["web"]
    assert domains["prose"]["n_tokens"] == trial0["n_tokens"] > domains["web"]["n_tokens"]
    assert domains["prose"]["kld_mean"] == pytest.approx(trial0["kld_mean"], abs=1e-5)
    assert domains["prose"]["ppl_quantized"] == pytest.approx(trial0["ppl"], abs=1e-3)
    shipped, chosen = report["final"]["domains"], report["iterations"][report["final"]["chosen_trial"]]["metrics"]
    assert list(shipped) == ["prose", "web", "code"]
    assert shipped["prose"]["kld_mean"] == pytest.approx(chosen["kld_mean"], abs=1e-5)
    assert shipped["web"]["kld_mean"] < domains["web"]["kld_mean"]  # measured again on the shipped weights
    assert "(the eval windows)" in (out / "report.md").read_text()
    plan = Plan.load(out / "plan.yaml")
    q = plan.modules[f"model.layers.{LAYER}.self_attn.q_proj"]
    v = plan.modules[f"model.layers.{LAYER}.self_attn.v_proj"]
    assert q.bits > 4 or v.bits > 4  # the planted module got more precision
    drivers = report["iterations"][1].get("drivers", {})
    assert drivers and set(drivers) & {"outlier_channels", "concentrated_layers"}


def test_diagnose_an_existing_checkpoint(compose, planted_dir, tmp_path):
    # export a W4 checkpoint, then diagnose it as quantized.name_or_path
    cfg = compose(tiny_overrides(planted_dir, tmp_path / "cache", **{
        "quant.group_size": 16, "thresholds.max_ppl_increase_pct": 1e6, "loop.max_iters": 1}))
    run(cfg, tmp_path / "export")
    ckpt = tmp_path / "export" / "checkpoint"
    cfg = compose(tiny_overrides(planted_dir, tmp_path / "cache", **{
        "mode": "diagnose", "quantized.name_or_path": str(ckpt), "diagnose.domain_seq_len": 64,
        "probes.max_new_tokens": 4}))
    report = run(cfg, tmp_path / "diag")
    exported = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["iterations"][0]["plan_summary"] == "W4g16-ckpt x28"  # its grid, read back exactly
    assert report["iterations"][0]["metrics"]["ppl"] == pytest.approx(
        exported["final"]["verified_metrics"]["ppl"], rel=1e-4)
    assert report["diagnosis"]["top_layers"][0] == LAYER
    # its calibration set is unknown (not quantfix's own c4), and it is compared with RTN at its own
    # scheme, computed afresh: the checkpoint is RTN W4g16, so the two agree and nothing is claimed
    diag = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert diag["calibration_domains"] == []
    check = diag["calibration_check"]
    assert check["kld"] == pytest.approx(check["rtn_kld"], rel=1e-3) and check["algorithms"] == ["the checkpoint"]
    assert not {"calibration_mismatch", "domain_gap"} & {f["kind"] for f in diag["findings"]}


def test_sensitivity_of_an_existing_checkpoint_is_not_reused_for_a_plan_with_the_same_labels(
        compose, tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    run(compose(tiny_overrides(tiny_dir, cache, **{"quant": "gptq", "quant.group_size": 32, "loop.max_iters": 1,
                                                   "thresholds.max_ppl_increase_pct": 1e6})), tmp_path / "export")
    ckpt = tmp_path / "export" / "checkpoint"
    a = run(compose(tiny_overrides(tiny_dir, cache, **DIAG, **{"quantized.name_or_path": str(ckpt)})),
            tmp_path / "diag_ckpt")
    b = run(compose(tiny_overrides(tiny_dir, cache, **DIAG, **{"quant.group_size": 32})), tmp_path / "diag_rtn")
    # the same widths (the checkpoint's modules are labelled ckpt: its own weights, not an RTN of ours)
    assert a["iterations"][0]["plan_summary"] == "W4g32-ckpt x14" and b["iterations"][0]["plan_summary"] == "W4g32 x14"
    assert len(list((cache / "sensitivity").glob("*.json"))) == 2
    sens = [json.loads((tmp_path / d / "diagnosis.json").read_text())["sensitivity"]["modules"]
            for d in ("diag_ckpt", "diag_rtn")]
    assert sens[0] != sens[1]


def test_options_scored_in_several_passes_give_the_same_run(compose, tiny_dir, tmp_path):
    """diagnose.sensitivity.options_memory_gb bounds the memory the options' simulated weights hold:
    a tiny budget scores them one module per Fisher pass, the bank keeping none (each chunk is
    handed back and dropped), and the run (option scores, plans, trials) is the one a single pass
    gives."""
    from quantfix.diagnose import option_chunks
    from tests.conftest import run_report as run
    from quantfix.bank import WeightBank

    over = {"quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
            "thresholds.max_kld_mean": 1e-6, "loop.ladder": "[3/0,4/0,5/0,8/0,16/0]", "plan.budget.avg_bits": 4.5,
            "loop.max_iters": 3}
    one = run(compose(tiny_overrides(tiny_dir, tmp_path / "c1", **over)), tmp_path / "one")
    many = run(compose(tiny_overrides(tiny_dir, tmp_path / "c2", **over,
                                      **{"diagnose.sensitivity.options_memory_gb": 1e-9})), tmp_path / "many")
    key = lambda r: [(it["plan_summary"], it["metrics"]["kld_mean"]) for it in r["iterations"]]  # noqa: E731
    assert key(one) == key(many)
    # where the memory goes: each stage's snapshot (peak so far never falls; the rises add up to
    # at most the run's peak) and the diagnosis's own parts
    stages = one["memory"]["stages"]
    assert {"load model", "calibration stats", "diagnose", "export"} <= set(stages)
    peaks = [v["host_peak_gb"] for v in stages.values()]
    assert all(0 < p <= one["memory"]["host_rss_peak_mb"] / 1024 + 0.01 for p in peaks)
    assert sum(v.get("host_peak_gb_rise", 0) for v in stages.values()) <= max(peaks) + 0.01
    diag = json.loads((tmp_path / "one" / "diagnosis.json").read_text())
    parts = {k for k in diag["timings_s"] if k.startswith("sensitivity: ")}
    assert set(diag["memory_gb"]) == {k for k in diag["timings_s"] if k != "total"} - parts
    # the sensitivity's own parts: one Fisher pass here, one per module (each a chunk) with the tiny budget
    many_diag = json.loads((tmp_path / "many" / "diagnosis.json").read_text())
    n_opt = len(json.loads((tmp_path / "many" / "diagnosis_full.json").read_text())["sensitivity"]["options"])
    assert diag["timings_s"]["sensitivity: passes"] == 1 and n_opt > 1
    assert many_diag["timings_s"]["sensitivity: passes"] == n_opt
    for d in (diag, many_diag):
        t = d["timings_s"]
        assert t["sensitivity: taylor"] + t["sensitivity: option simulation"] + t["sensitivity: fisher passes"] \
            <= t["sensitivity"] + 0.05

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    from quantfix.plan import Precision
    bank = WeightBank(model, ["0", "1"])
    options = {n: {f"W{b}": Precision(b, 0, True, "mse") for b in (4, 5, 6)} for n in ("0", "1")}
    seen = []
    for chunk in option_chunks(bank, options, 64 * 64 * 4 * 3 / 2 ** 30):  # one module's options fit
        seen.append(sorted(chunk))
        # handed back, never kept by the bank: a chunk lives as long as the caller holds it
        assert not bank._sim and all(w.shape == (64, 64) and w.dtype == torch.float32
                                     for o in chunk.values() for w in o.values())
    assert seen == [["0"], ["1"]] and not bank._sim
    assert [sorted(c) for c in option_chunks(bank, options, 1.0)] == [["0", "1"]] and len(bank._sim) == 6  # one chunk: kept


def test_histograms_show_the_most_sensitive_inputs_too():
    """By ratio alone the demo drew layer 9's input and not layer 29 down_proj's, the most
    sensitive module (the same 54x ratio, 51 outlier channels)."""
    from quantfix.diagnose import histogram_inputs

    rows = [{"input_of": [f"model.layers.{i}.mlp.down_proj"], "sensitivity": s}
            for i, s in ((11, 0.094), (28, 0.017), (2, 0.028), (9, 0.014), (29, 0.096), (1, 0.010))]
    assert histogram_inputs(rows, 4) == ["model.layers.11.mlp.down_proj", "model.layers.29.mlp.down_proj",
                                         "model.layers.28.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert histogram_inputs(rows, 1) == ["model.layers.11.mlp.down_proj"]
    assert histogram_inputs(rows[:1], 4) == ["model.layers.11.mlp.down_proj"]
