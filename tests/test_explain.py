"""What a repair changed and why: change groups between plan 0 and the shipped plan, the findings
that name them, what was applied to a finding's modules, and the legend of the plan labels."""
from quantfix import explain
from quantfix.diagnose.findings import Finding
from quantfix.evaluate import Metrics
from quantfix.plan import Plan
from quantfix.quantize.algorithms import Precision
from quantfix.runreport import RunReport

TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
NAMES = [f"model.layers.{i}.{t}" for i in range(3) for t in TYPES]
W4 = Precision(4, 64, True, "rtn")


def plans(changed):
    shapes = {n: (128, 256) for n in NAMES}
    plan0 = Plan({n: W4 for n in NAMES}, shapes, other_params=1000)
    return plan0, plan0.with_changes(changed)


def outlier(channel, ratio, modules):
    return Finding("outlier_channels", f"outlier activation channel {channel}", "AWQ, LLM.int8, or INT8",
                   {"channel": channel, "ratio": ratio, "value": 3000.0, "median": 1.8, "n_outliers": 8,
                    "sensitivity_share": 0.1}, modules=modules)


def test_changes_group_modules_by_labels_with_kind_and_the_findings_that_name_them():
    w6 = Precision(6, 64, True, "gptq_imatrix")
    plan0, shipped = plans({
        "model.layers.1.mlp.down_proj": w6, "model.layers.2.mlp.down_proj": w6,
        "model.layers.0.self_attn.q_proj": Precision(4, 32, True, "rtn"),
        "model.layers.0.self_attn.k_proj": Precision(),  # kept in float
        "model.layers.2.self_attn.v_proj": Precision(4, 64, True, "imatrix"),
        "model.layers.2.self_attn.q_proj": Precision(8, 0, True, "imatrix")})
    findings = [outlier(1229, 1797.6, ["model.layers.1.mlp.down_proj"]),
                Finding("concentrated_layers", "layer 2 holds it", "INT8", {"share": 0.6, "sensitivity": {"2": 0.1}},
                        layers=[2]),
                Finding("spread_evenly", "spread", "smaller groups", {"share": 0.3}),
                Finding("divergence", "diverges", "-", {"first_divergence": [0, 1]})]
    groups = explain.changes(plan0, shipped, findings)
    by_pair = {(g.before, g.after): g for g in groups}
    assert set(by_pair) == {("W4g64", "W6g64-gptq-imx"), ("W4g64", "W4g32"), ("W4g64", "FP16"),
                            ("W4g64", "W4g64-imx"), ("W4g64", "W8ch-imx")}
    assert sum(g.count for g in groups) == 6  # the unchanged modules are in no group
    six = by_pair[("W4g64", "W6g64-gptq-imx")]
    assert six.kind == "more bits" and six.count == 2 and six.what == "4→6 bits, GPTQ-imatrix rounding (was RTN)"
    reasons = {r.kind: r for r in six.reasons}
    # the outlier finding names layer 1's down_proj; concentrated_layers names layer 2 (so its down_proj)
    assert reasons["outlier_channels"].modules == ["model.layers.1.mlp.down_proj"]
    assert reasons["outlier_channels"].text == "outlier channel 1229 (1,798x the median)"
    assert reasons["concentrated_layers"].modules == ["model.layers.2.mlp.down_proj"]
    assert explain.unexplained(six) == 0
    assert groups[0].kind == "kept in float"  # listed first
    # a model-wide finding explains the kind of change it asks for: spread_evenly -> smaller groups
    assert by_pair[("W4g64", "W4g32")].kind == "smaller group"
    assert [r.kind for r in by_pair[("W4g64", "W4g32")].reasons] == ["spread_evenly"]
    assert by_pair[("W4g64", "W4g64-imx")].kind == "other rounding"
    assert explain.unexplained(by_pair[("W4g64", "FP16")]) == 1  # no finding names layer 0's k_proj
    assert all(r.kind != "divergence" for g in groups for r in g.reasons)  # a symptom names no module


def test_no_changes_when_plan_0_ships():
    plan0, _ = plans({})
    assert explain.changes(plan0, plan0, [outlier(5, 40.0, [NAMES[0]])]) == []


def test_applied_says_what_the_shipped_plan_did_to_a_findings_modules():
    plan0, shipped = plans({NAMES[3]: Precision(6, 64, True, "gptq_imatrix"),
                            NAMES[7]: Precision(6, 64, True, "gptq_imatrix"), NAMES[0]: Precision(8, 0, True, "rtn")})
    groups = explain.changes(plan0, shipped, [])
    assert explain.applied([NAMES[3], NAMES[7], NAMES[0], NAMES[1]], groups) == \
        "4 modules: 2 to W6g64-gptq-imx, 1 to W8ch, 1 unchanged"
    assert explain.applied([NAMES[3]], groups) == "layer 0 down_proj to W6g64-gptq-imx"
    assert explain.applied([NAMES[3], NAMES[7]], groups) == "all 2 modules to W6g64-gptq-imx"
    assert explain.applied([NAMES[1]], groups) == "layer 0 k_proj unchanged"


def test_named_modules_by_name_or_layer():
    f = Finding("concentrated_layers", "", "", {"share": 0.5}, modules=["model.layers.0.mlp.down_proj"], layers=[2])
    assert explain.named_modules(f, NAMES) == ["model.layers.0.mlp.down_proj"] + [n for n in NAMES if ".2." in n]


def test_legend_explains_the_labels_that_occur_and_no_others():
    lines = explain.legend(["W4g64", "W8ch-imx", "W4g32a-gptq-imx", "FP16"])
    text = "\n".join(lines)
    assert "W4g64: 4-bit integers, one 16-bit scale per group of 64 input weights (4.25 bits per weight)" in lines
    assert "W8ch: 8-bit integers, one 16-bit scale per output channel" in lines
    assert "W4g32a: 4-bit integers, one 16-bit scale per group of 32 input weights and a 4-bit zero point " \
           "(asymmetric) (4.62 bits per weight)" in lines
    assert "-imx: round to nearest, clipping searched on the calibration data's E[x^2] (imatrix)" in lines
    assert any(line.startswith("-gptq-imx: GPTQ") for line in lines)
    assert any(line.startswith("(no suffix): round to nearest") for line in lines)
    assert "FP16: kept in float (16-bit), not quantized" in lines
    assert "-awq" not in text and "AutoRound" not in text and "W5" not in text
    assert explain.parse_labels("W4g64 x2, W8ch-imx x22, LLM.int8 x3") == ["W4g64", "W8ch-imx", "LLM.int8"]


def test_short_texts():
    assert explain.short_module("model.layers.11.mlp.down_proj") == "layer 11 down_proj"
    assert explain.short_module("lm_head") == "lm_head"
    assert explain.short(outlier(678, 318.0, [])) == "outlier channel 678 (318x the median)"
    assert explain.short(Finding("concentrated_layers", "", "", {"share": 0.73}, layers=[0])) == \
        "layer 0 holds 73% of the damage"
    assert explain.ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_change_groups_round_trip_through_report_json():
    plan0, shipped = plans({NAMES[3]: Precision(6, 64, True, "gptq_imatrix")})
    groups = explain.changes(plan0, shipped, [outlier(1229, 1797.6, [NAMES[3]])])
    m = Metrics(10.0, 2.3, 0.0, 0.0, 0.0, 1.0, 100)
    report = RunReport(model="m", config={}, baseline=m, changes=groups)
    d = report.to_dict()
    assert d["changes"][0]["reasons"][0]["kind"] == "outlier_channels"
    assert RunReport.from_dict(d).changes == groups
    assert "changes" not in RunReport(model="m", config={}, baseline=m).to_dict()  # written only when set


def test_a_budget_below_plan_0_is_the_why_of_fewer_bits_not_the_findings_that_ask_for_more():
    """Budget mode may store modules in fewer bits per weight than plan 0 (W4g64 -> W3g64a, or a larger group). The
    group says so (``saves``), what was applied to a finding's modules says so, and the report's why names the budget:
    an outlier finding on such a module asks for more precision, so it is not why the module got fewer bits
    (a budget run on the demo read 'why: outlier channel 1229 (2,478x the median)' for 89 modules sent 4 -> 3 bits)."""
    from quantfix import report as rep
    w3 = Precision(3, 64, False, "gptq_imatrix")
    plan0, shipped = plans({NAMES[3]: w3, NAMES[7]: w3, NAMES[0]: Precision(4, 128, True, "imatrix"),
                            NAMES[1]: Precision(6, 64, True, "gptq_imatrix")})
    groups = explain.changes(plan0, shipped, [outlier(1229, 2478.3, [NAMES[3]])])
    by_after = {g.after: g for g in groups}
    assert by_after["W3g64a-gptq-imx"].saves and by_after["W4g128-imx"].saves  # fewer bits; a larger group
    assert not by_after["W6g64-gptq-imx"].saves
    assert by_after["W4g128-imx"].kind == "larger group"
    assert explain.applied([NAMES[3]], groups) == "layer 0 down_proj to W3g64a-gptq-imx (fewer bits than plan 0)"
    assert explain.applied([NAMES[3], NAMES[1]], groups) == \
        "2 modules: 1 to W3g64a-gptq-imx (fewer bits than plan 0), 1 to W6g64-gptq-imx"
    why = rep._why(by_after["W3g64a-gptq-imx"])
    assert why.startswith("the budget: fewer bits where they add the least KLD")
    assert "1 of them (layer 0 down_proj) is named by findings that ask for more precision" in why
    assert "outlier channel 1229 (2,478x the median)" in why
    assert rep._why(by_after["W4g128-imx"]) == "the budget: fewer bits where they add the least KLD (measured sensitivity)"
    # more bits: the finding is the why, as before
    assert "the budget" not in rep._why(by_after["W6g64-gptq-imx"])
    m = Metrics(10.0, 2.3, 0.0, 0.0, 0.0, 1.0, 100)
    assert RunReport.from_dict(RunReport(model="m", config={}, baseline=m, changes=groups).to_dict()).changes == groups
