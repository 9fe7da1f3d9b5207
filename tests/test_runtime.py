"""Batching with out-of-memory back-off (``quantfix.runtime.Runtime.batched``)."""
import pytest
import torch

from quantfix.errors import QuantfixError
from quantfix.runtime import Runtime
from tests.conftest import tiny_overrides


def test_batched_halves_the_batch_size_on_out_of_memory_and_keeps_it():
    rt = Runtime(model=None, tokenizer=None, device=torch.device("cpu"), batch_size=8)
    seen = []

    def fits_two(bs):
        seen.append(bs)
        if bs > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return 10 * bs

    assert rt.batched(fits_two) == 20 and seen == [8, 4, 2] and rt.batch_size == 2
    assert rt.batched(fits_two) == 20 and seen[3:] == [2]  # kept for the rest of the run
    with pytest.raises(ValueError):  # any other error is not a reason to shrink
        rt.batched(lambda bs: int("x"))
    assert rt.batch_size == 2

    def never(bs):
        raise torch.cuda.OutOfMemoryError("simulated")

    with pytest.raises(QuantfixError, match="out of GPU memory at eval.batch_size=1: lower eval.seq_len"):
        rt.batched(never)


def test_out_of_memory_halves_the_batch_size_and_keeps_the_result(compose, tiny_dir, tmp_path, monkeypatch):
    """eval.batch_size=0 is auto (4 on the CPU); a CUDA out-of-memory error halves it and retries,
    which must not change any metric. The OOM is simulated: batches larger than 2 windows 'do not fit'."""
    from quantfix import evaluate as ev
    from tests.conftest import run_report as run

    common = {"thresholds.max_ppl_increase_pct": 1000, "loop.max_iters": 1, "export.enabled": "false",
              "diagnose.probes": "false"}
    plain = run(compose(tiny_overrides(tiny_dir, tmp_path / "c1", **common, **{"eval.batch_size": 0})),
                tmp_path / "plain")
    assert plain["eval_batch_size"] == 4
    real = ev.Evaluator.__call__

    def small_only(self, model, windows, batch_size, *a, **k):
        if batch_size > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(self, model, windows, batch_size, *a, **k)

    monkeypatch.setattr(ev.Evaluator, "__call__", small_only)
    oom = run(compose(tiny_overrides(tiny_dir, tmp_path / "c2", **common, **{"eval.batch_size": 0})), tmp_path / "oom")
    assert oom["eval_batch_size"] == 2
    assert oom["iterations"][0]["metrics"] == pytest.approx(plain["iterations"][0]["metrics"], rel=1e-5)

    def never(*a, **k):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(ev.Evaluator, "__call__", never)
    from quantfix.errors import QuantfixError

    with pytest.raises(QuantfixError, match="out of GPU memory at eval.batch_size=1"):
        run(compose(tiny_overrides(tiny_dir, tmp_path / "c3", **common, **{"eval.batch_size": 0})), tmp_path / "x")


_FAULTS = r"""
import resource, sys, torch
from quantfix.runtime import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
n = 100 * 2 ** 18  # 100 MB of float32: above glibc's 32 MB mapping cap, like a batch's activations and logits


def step():
    a = torch.ones(n); b = torch.ones(n); c = a + b; del a, b, c


step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_host_memory_is_reused_with_fewer_page_faults():
    """A CPU run allocates and frees the same large tensors batch after batch: by default glibc maps each
    block above 32 MB afresh and every page faults again (five steps of three 100 MB tensors: about
    384k faults); after keep_freed_host_memory freed blocks are served again (a third to three quarters
    as many here: 128k, 154k or 282k in seven runs on a 2-core VM, by where the aligned blocks land in the
    heap; the demo run: 11.5M -> 2.0M). Three runs, each below 0.8x. In a subprocess: the setting lasts for
    the process."""
    import subprocess
    import sys

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, n = out.stdout.split()
        return applied == "True", int(n)

    runs = [faults("keep") for _ in range(3)]
    _, fresh = faults("default")
    assert fresh > 5 * 3 * 25_000  # every 100 MB tensor mapped afresh: 25.6k pages of 4 KB each
    if all(applied for applied, _ in runs):  # glibc
        assert all(kept < 0.8 * fresh for _, kept in runs), (runs, fresh)


def test_cpu_runs_keep_freed_host_memory_unless_told_not_to(compose, tiny_dir, tmp_path, monkeypatch):
    """The loop asks for it on the CPU (config host_memory_reuse, on by default), and not when it is off."""
    from quantfix import recipe

    calls = []
    monkeypatch.setattr(recipe, "keep_freed_host_memory", lambda: calls.append(1) or True)
    for flag, expected in (("true", 1), ("false", 0)):
        calls.clear()
        cfg = compose(tiny_overrides(tiny_dir, tmp_path / "cache", **{"mode": "baseline", "host_memory_reuse": flag}))
        recipe.run(cfg, tmp_path / f"run_{flag}")
        assert len(calls) == expected
