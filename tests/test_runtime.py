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
