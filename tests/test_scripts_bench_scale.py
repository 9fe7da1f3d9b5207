"""``scripts/bench_scale.py``: the 70B extrapolation from sliced models and its plot."""


def test_bench_scale_extrapolates_slices_and_plots(tmp_path):
    """bench_scale's 70B arithmetic: per stage a + b x layers through the slices, evaluated at the
    full depth; a stage that falls with depth is a fixed cost, not a negative one; the plot's bars
    split the diagnosis into its parts and carry every second of the run."""
    from tests.conftest import load_script

    bs = load_script("bench_scale")

    def row(layers, diag, load):
        parts = {"sensitivity: taylor": 1.0, "sensitivity: option simulation": 10.0 * layers,
                 "sensitivity: fisher passes": 2.0 * layers, "sensitivity: passes": layers}
        return {"size": "70b", "layers": layers, "slice_of": 80, "params": 1e9 + layers * 8.6e8, "rc": 0,
                "timings_s": {"diagnose": diag, "load model": load, "total": diag + load + 5.0},
                "diagnose_timings_s": parts, "peak_host_gb_run": 6.0 + 2.0 * layers, "memory": {"device_peak_mb": 1024.0}}
    rows = [row(2, 30.0, 12.0), row(4, 54.0, 10.0)]
    e = bs.extrapolate(rows)["70b"]
    assert e["seconds"]["diagnose"]["per_layer"] == 12.0 and e["seconds"]["diagnose"]["at_full_depth"] == 6.0 + 12.0 * 80
    assert e["seconds"]["load model"] == {"per_layer": 0.0, "fixed": 12.0, "at_full_depth": 12.0}
    assert e["peak_host_gb"]["at_full_depth"] == 166.0
    assert e["diagnose_parts"]["sensitivity: option simulation"]["at_full_depth"] == 800.0
    secs = bs._plot_seconds(rows[1])
    assert secs["sensitivity: option simulation"] == 40.0 and secs["diagnose (rest)"] == 54.0 - 1.0 - 40.0 - 8.0
    assert abs(sum(secs.values()) - rows[1]["timings_s"]["total"]) < 1e-9
    res = {"rows": rows, "extrapolated": {"70b": e}, "gpu": "test"}
    png = bs.plot(res, tmp_path / "scale.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
