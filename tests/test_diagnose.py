"""Diagnosis on planted faults: a function-preserving rescale the float model does not notice but
quantization does must come out as the most sensitive layer, its channel as an outlier, and the
repair must protect that module."""
import json

import pytest
import torch

from quantfix.diagnose import probes
from quantfix.diagnose.findings import Diagnosis
from quantfix.diagnose.rules import root_causes
from quantfix.diagnose.sensitivity import Sensitivity
from quantfix.diagnose.sensitivity import PassSettings, fisher
from tests.conftest import run_report as run
from quantfix.plan import Plan
from quantfix.quantize import fake
from tests.conftest import save_model_dir, tiny_llama, tiny_overrides

LAYER, CHANNEL, ALPHA, FEATURE = 2, 7, 100.0, 8.0


def base_model(seed=0):
    """A tiny random Llama in which hidden channel CHANNEL matters to layer LAYER's attention
    (its q/k/v input columns are FEATURE x larger), as real features do."""
    model = tiny_llama(seed=seed, layers=4)
    layer = model.model.layers[LAYER]
    with torch.no_grad():
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight[:, CHANNEL] *= FEATURE
    return model


def planted(seed=0):
    """Scale input_layernorm channel CHANNEL of layer LAYER by ALPHA and divide the matching input
    column of q/k/v by ALPHA: the float function is unchanged, but that channel becomes a massive
    activation and its weights shrink below the group's rounding step."""
    model = base_model(seed)
    layer = model.model.layers[LAYER]
    with torch.no_grad():
        layer.input_layernorm.weight[CHANNEL] *= ALPHA
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight[:, CHANNEL] /= ALPHA
    return model


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


def test_repair_protects_the_planted_module(compose, planted_dir, tmp_path):
    cfg = compose(tiny_overrides(planted_dir, tmp_path / "cache", **{
        "quant.group_size": 16, "thresholds.max_ppl_increase_pct": "null", "thresholds.max_kld_mean": 0.01,
        "diagnose.domain_seq_len": 64, "probes.max_new_tokens": 4, "loop.max_iters": 5,
        "loop.ladder": "[4/16,8/0,16/0]"}))
    out = tmp_path / "run"
    report = run(cfg, out)
    assert not report["iterations"][0]["passed"]
    assert report["final"]["passed"], report["final"]
    plan = Plan.load(out / "plan.yaml")
    q = plan.modules[f"model.layers.{LAYER}.self_attn.q_proj"]
    v = plan.modules[f"model.layers.{LAYER}.self_attn.v_proj"]
    assert q.bits > 4 or v.bits > 4  # the planted module got more precision
    drivers = report["iterations"][1].get("drivers", {})
    assert drivers and set(drivers) & {"outlier_channels", "concentrated_layers"}


def test_fisher_ranks_the_planted_layer_first():
    model = planted()
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    qw = {n: fake.rtn(dict(model.named_modules())[n].weight.detach(), 4, 16, True) for n in names}
    s = fisher(model, torch.randint(0, 384, (4, 64), generator=torch.Generator().manual_seed(0)), qw,
               settings=PassSettings(batch_size=2, progress=False))
    assert s.ranked_layers()[0] == LAYER
    top_module = max(s.modules, key=s.modules.get)
    assert f"layers.{LAYER}.self_attn" in top_module


def test_fisher_in_chunks_scores_the_options_of_one_pass():
    from quantfix.diagnose.sensitivity import fisher_chunks

    model = planted()
    mods = dict(model.named_modules())
    names = [n for n in mods if n.endswith("proj")]
    qw = {n: fake.rtn(mods[n].weight.detach(), 4, 16, True) for n in names}
    opts = {n: {f"W{b}": fake.rtn(mods[n].weight.detach(), b, 16, True) for b in (5, 8)} for n in names}
    ids = torch.randint(0, 384, (4, 64), generator=torch.Generator().manual_seed(0))
    one = fisher(model, ids, qw, opts, PassSettings(batch_size=2, progress=False))
    split = fisher_chunks(model, ids, qw, [{n: opts[n]} for n in names], PassSettings(batch_size=2, progress=False))
    assert split.modules == one.modules
    assert set(split.options) == set(one.options)
    for n in names:
        for lab, v in one.options[n].items():
            assert split.options[n][lab] == pytest.approx(v, rel=1e-5)


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


def test_batched_probes_generate_what_one_at_a_time_does(tokenizer):
    """All probes in one left-padded generate call: the same greedy tokens as one call per prompt,
    cut after the first EOS."""
    model = tiny_llama(seed=5, layers=2)
    prompts = [{"domain": "a", "prompt": "def f(x):\n    return"}, {"domain": "b", "prompt": "The"},
               {"domain": "c", "prompt": "import os\nimport sys\n\nclass Config:\n    name ="}]
    one = probes.generate(model, tokenizer, prompts, 12, progress=False, batched=False)
    many = probes.generate(model, tokenizer, prompts, 12, progress=False, batched=True)
    assert many == one
    assert all(0 < len(r) <= 12 for r in many)


def test_probe_helpers():
    assert probes.repetition([1, 2, 3, 4] * 6)["loop"]
    assert not probes.repetition(list(range(24)))["loop"]
    assert probes.first_divergence([1, 2, 3], [1, 2, 4]) == 2 and probes.first_divergence([1], [1]) is None
    assert probes.is_refusal("I'm sorry, but I cannot help with that.") and not probes.is_refusal("Sure: 42.")


def _diagnosis(layers, modules, metrics, outliers=(), domains=None, calibration=("c4",)) -> Diagnosis:
    return Diagnosis(plan_summary="", avg_bits=4.0, metrics=metrics,
                     sensitivity=Sensitivity("fast", layers, {}, modules), outliers=list(outliers), channel_errors={},
                     domains=domains or {}, generations=[], calibration_domains=list(calibration))


def test_root_causes_domain_gap_and_ppl_hides_damage():
    from quantfix.config import DiagnoseConfig

    diag = _diagnosis({i: 1.0 for i in range(10)}, {},
                      {"ppl_increase_pct": 0.8, "quantized": {"kld_mean": 0.12, "top1": 0.8}},
                      domains={"prose": {"ppl_increase_pct": 2.0}, "web": {"ppl_increase_pct": 1.5},
                               "code": {"ppl_increase_pct": 14.0}})
    f = {x.kind: x for x in root_causes(diag, DiagnoseConfig())}
    assert "calibrate on code" in f["domain_gap"].fix and "humaneval" in f["domain_gap"].fix
    assert f["domain_gap"].domain == "code" and f["domain_gap"].source == "humaneval"
    assert "ppl_hides_damage" in f and "spread_evenly" in f
    # calibrating on the code domain removes the gap finding
    diag.calibration_domains = ["c4", "humaneval"]
    assert "domain_gap" not in {x.kind for x in root_causes(diag, DiagnoseConfig())}
    # judged by source: Python's docs are prose too, but not the WikiText-2 text the prose domain is
    diag.domains = {"prose": {"ppl_increase_pct": 50.2}, "web": {"ppl_increase_pct": 36.8},
                    "code": {"ppl_increase_pct": 14.9}}  # measured: the demo, W4g64 GPTQ calibrated on pydoc
    diag.calibration_domains = ["pydoc"]
    gap = {x.kind: x for x in root_causes(diag, DiagnoseConfig())}["domain_gap"]
    assert gap.domain == "prose" and gap.source == "wikitext2"


def test_an_existing_checkpoint_worse_than_rtn_is_a_calibration_mismatch_of_unknown_data():
    """Issue 13's case: a GPTQ checkpoint calibrated on Python's docs, diagnosed on WikiText-2 (PPL
    71.9 vs RTN's 53.6). Its calibration set is unknown: no claim about quantfix's own c4; the
    evidence is the comparison with RTN and the per-domain pattern."""
    from quantfix.config import DiagnoseConfig

    diag = _diagnosis({i: 1.0 for i in range(10)}, {}, {"ppl_increase_pct": 99.0,
                                                        "quantized": {"kld_mean": 0.6, "top1": 0.6}},
                      domains={"prose": {"ppl_increase_pct": 94.3}, "web": {"ppl_increase_pct": 65.0},
                               "code": {"ppl_increase_pct": 25.0}}, calibration=())
    diag.eval_source = "wikitext2"
    diag.calibration_check = {"kld": 0.60, "rtn_kld": 0.41, "algorithms": ["the checkpoint"]}
    f = {x.kind: x for x in root_causes(diag, DiagnoseConfig())}
    assert "domain_gap" not in f  # unknown calibration data is not absent calibration data
    m = f["calibration_mismatch"]
    assert "calibration set is unknown" in m.finding and "prose +94.3%" in m.finding and "c4" not in m.finding
    assert "data.domains=[wikitext2]" in m.fix
    diag.calibration_check = {"kld": 0.41, "rtn_kld": 0.41, "algorithms": ["the checkpoint"]}  # plain RTN itself
    assert "calibration_mismatch" not in {x.kind for x in root_causes(diag, DiagnoseConfig())}


def test_char_loops_are_repetition_loops():
    assert probes.char_loop("The answer is P.S.I.E.S.A.L.A.L.A.L.A.L.A.")
    assert probes.char_loop("ok ok ok ok ok ok")
    assert not probes.char_loop("The capital of France is Paris, a city on the Seine.")
    assert not probes.char_loop("aaa")  # too short to call


def test_outlier_findings_group_residual_channels_and_merge_the_tail():
    """A residual-stream channel that is an outlier in the q/k/v inputs of many layers is one cause:
    one finding; beyond max_outlier_findings the rest merge into one. No module is dropped."""
    from quantfix.config import DiagnoseConfig

    mods = {}
    outliers = []
    for i in range(8):
        qkv = [f"model.layers.{i}.self_attn.{t}_proj" for t in "qkv"]
        down = f"model.layers.{i}.mlp.down_proj"
        for m in qkv + [down]:
            mods[m] = 1.0
        outliers.append({"input_of": qkv, "float": {"n_outliers": 1, "top": [[7, 90.0 + i]], "median": 1.0,
                                                     "ratio": 90.0 + i}})
        outliers.append({"input_of": [down], "float": {"n_outliers": 1, "top": [[100 + i, 10.0 * (i + 1)]],
                                                        "median": 1.0, "ratio": 10.0 * (i + 1)}})
    mods.update({f"model.layers.{i}.mlp.up_proj": 0.0 for i in range(300)})  # top 10% = the 32 above
    diag = _diagnosis({i: 1.0 for i in range(8)}, mods,
                      {"ppl_increase_pct": 10.0, "quantized": {"kld_mean": 0.1, "top1": 0.8}}, outliers)
    found = [f for f in root_causes(diag, DiagnoseConfig(max_outlier_findings=4)) if f.kind == "outlier_channels"]
    assert len(found) == 4
    assert "residual-stream channel 7" in found[0].finding and "8 layers (0-7" in found[0].finding
    assert len(found[0].modules) == 24
    assert [f.evidence["ratio"] for f in found[1:3]] == [80.0, 70.0]  # the two largest down_proj
    assert found[3].finding.startswith("6 more inputs")
    covered = sorted(m for f in found for m in f.modules)
    assert covered == sorted(m for o in outliers for m in o["input_of"])


def test_calibration_mismatch_when_calibrated_rounding_is_no_better_than_rtn():
    from quantfix.config import DiagnoseConfig

    metrics = {"ppl_increase_pct": 30.0, "quantized": {"kld_mean": 0.5, "top1": 0.7}}
    diag = _diagnosis({i: 1.0 for i in range(10)}, {}, metrics, calibration=("pydoc",))
    diag.eval_source = "wikitext2"
    diag.calibration_check = {"kld": 0.50, "rtn_kld": 0.45, "algorithms": ["gptq"]}
    (f,) = [x for x in root_causes(diag, DiagnoseConfig()) if x.kind == "calibration_mismatch"]
    assert f.source == "wikitext2" and "data.domains=[pydoc, wikitext2]" in f.fix and "0.5000 vs 0.4500" in f.finding
    diag.calibration_check = {"kld": 0.30, "rtn_kld": 0.45, "algorithms": ["gptq"]}  # calibration helps: no finding
    assert "calibration_mismatch" not in {x.kind for x in root_causes(diag, DiagnoseConfig())}
    diag.calibration_check = {"kld": 0.50, "rtn_kld": 0.45, "algorithms": ["gptq"]}
    diag.calibration_domains = ["pydoc", "wikitext2"]  # already calibrated on the deployment text
    assert "calibration_mismatch" not in {x.kind for x in root_causes(diag, DiagnoseConfig())}


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
