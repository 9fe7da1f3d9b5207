"""``scripts/bench_repair.py``: split streams still compare at matched bits, and the merged table plots."""
import json
import time
import types
from pathlib import Path

from tests.conftest import load_script


def _load():
    return load_script("bench_repair")


def test_peer_bits_reads_other_streams_rows(tmp_path):
    """A quantfix stream learns the bits its peer stream's AutoScheme rows landed at (below the budget,
    that budget only, AutoScheme rows only), waiting for a part file that is not written yet only
    until --peer-wait has passed."""
    br = _load()
    part = tmp_path / "part_demo_as0_4.5.json"
    part.write_text(json.dumps({"rows": [
        {"budget": 4.5, "method": "AutoRound AutoScheme (W2/W3/W4/W8 g64, iters=0)", "avg_bits": 4.433},
        {"budget": 3.5, "method": "AutoRound AutoScheme (W2/W3/W4/W8 g64, iters=0)", "avg_bits": 3.45},
        {"budget": 4.5, "method": "uniform GPTQ W4g32", "avg_bits": 4.4},
        {"budget": 5.0, "method": "AutoRound AutoScheme (W2/W3/W4/W8 g64, iters=0)", "avg_bits": 5.0}]}))
    a = types.SimpleNamespace(peers_from=[str(part)], peer_wait=30.0)
    t = time.time()
    assert br.peer_bits(4.5, [], a, wait=True) == [4.433]
    assert br.peer_bits(3.5, [], a, wait=True) == [3.45]
    assert br.peer_bits(5.0, [], a, wait=True) == []  # landed at the budget: nothing to match
    assert time.time() - t < 5  # found at once: no waiting
    assert br.peer_bits(4.5, [], a, wait=False) == []  # without waiting only this process's peers count
    own = [{"method": "AutoRound AutoScheme (W2/W3/W4/W8 g64, iters=200)", "avg_bits": 4.41}]
    assert br.peer_bits(4.5, own, a, wait=True) == [4.41, 4.433]
    missing = types.SimpleNamespace(peers_from=[str(tmp_path / "never.json")], peer_wait=0.0)
    assert br.peer_bits(4.5, [], missing, wait=True) == []


def test_autoscheme_bits_matches_the_peers_measured_rows():
    """The matched-bits target without waiting: AutoScheme's accounting of each budget, against the bits
    its rows reloaded at on the demo (repair_h100_demo.json): at or just above them, never below by more
    than rounding."""
    br = _load()
    rows = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "repair_h100_demo.json").read_text())
    seen = {r["budget"]: r["avg_bits"] for r in rows["rows"]
            if r.get("method", "").startswith("AutoRound AutoScheme") and "avg_bits" in r}
    assert sorted(seen) == [3.0, 3.5, 4.0, 4.5, 5.0]
    for b, bits in seen.items():
        assert 0 <= br.autoscheme_bits(b) - bits < 0.003, (b, bits, br.autoscheme_bits(b))


def test_merge_writes_table_and_plot(tmp_path, capsys):
    br = _load()
    base = {"model": "demo", "device": "cpu", "gpu": None, "baseline": {"ppl": 36.0}, "eval": "wikitext2 2x64",
            "calibration": "c4 2x64"}
    rows_a = [{"budget": 4.5, "method": "quantfix from W4g64", "avg_bits": 4.5, "kld_mean": 0.11, "ppl": 40.0,
               "top1": 0.8, "checkpoint_mb": 120.0, "seconds": 300.0}]
    rows_b = [{"budget": 4.5, "method": "AutoRound AutoScheme (W2/W3/W4/W8 g64, iters=0)", "avg_bits": 4.433,
               "kld_mean": 0.154, "ppl": 41.7, "top1": 0.78, "checkpoint_mb": 119.2, "seconds": 343.0}]
    merged = br.merge([dict(base, rows=rows_a), dict(base, rows=rows_b)])
    assert [r["method"] for r in merged["rows"]] == [rows_a[0]["method"], rows_b[0]["method"]]
    png = tmp_path / "m.png"
    br.plot(merged, png)
    assert png.stat().st_size > 1000
    br.print_table(merged)
    out = capsys.readouterr().out
    assert "| 4.5 | quantfix from W4g64 | 4.500 | 0.1100 |" in out and "0.1540" in out


def test_table_says_when_the_tuned_plan_was_not_kept(capsys):
    br = _load()
    base = {"model": "demo", "device": "cpu", "gpu": None, "baseline": {"ppl": 36.0}, "eval": "wikitext2 2x64",
            "calibration": "c4 2x64"}
    row = {"budget": 3.0, "method": "quantfix + AutoRound tuning from W4g64", "avg_bits": 2.936, "kld_mean": 1.0428,
           "ppl": 99.2, "top1": 0.46, "checkpoint_mb": 99.3, "seconds": 512.0}
    br.print_table(dict(base, rows=[dict(row, tuning_kept=False), dict(row, budget=3.5)]))
    out = capsys.readouterr().out
    assert "| 3.0 | quantfix + AutoRound tuning from W4g64 (tuning not kept) | 2.936 |" in out
    assert "| 3.5 | quantfix + AutoRound tuning from W4g64 | 2.936 |" in out


def test_rows_that_differ_only_in_overrides_are_told_apart(tmp_path, capsys, monkeypatch):
    """A row run with --override flags carries them in the table and in its plot line (rows with and without
    a setting would otherwise print alike and join one line of the plot)."""
    br = _load()
    base = {"model": "demo", "device": "cpu", "gpu": None, "baseline": {"ppl": 36.0}, "eval": "wikitext2 2x64",
            "calibration": "c4 2x64"}
    row = {"budget": 3.0, "method": "quantfix + AutoRound tuning from W4g64", "avg_bits": 2.937, "kld_mean": 0.6377,
           "ppl": 69.5, "top1": 0.55, "checkpoint_mb": 99.3, "seconds": 449.0}
    rows = [row, dict(row, kld_mean=0.6040, overrides=["loop.tune_alg_ext=true"])]
    br.print_table(dict(base, rows=rows))
    out = capsys.readouterr().out
    assert "| 3.0 | quantfix + AutoRound tuning from W4g64 | 2.937 | 0.6377 |" in out
    assert "| 3.0 | quantfix + AutoRound tuning from W4g64 [loop.tune_alg_ext=true] | 2.937 | 0.6040 |" in out
    import matplotlib.axes
    lines = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: lines.append(k.get("label")) or real(ax, *a, **k))
    br.plot(dict(base, rows=rows), tmp_path / "p.png")
    assert sorted(lines) == ["quantfix + AutoRound tuning from W4g64",
                             "quantfix + AutoRound tuning from W4g64 [loop.tune_alg_ext=true]"]
