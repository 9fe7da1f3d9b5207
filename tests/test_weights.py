"""A module's weight wherever it lives (``quantfix.weights``): on the CPU, on an accelerator (how much
room it has under ``device_memory_gb``) or offloaded by accelerate (a whole run through the offload
map gives the run in memory)."""
import pytest
import torch

import torch.nn.functional as F

from quantfix import weights
from tests.conftest import tiny_llama, tiny_overrides


def test_set_weight_and_weight_of_round_trip_on_the_cpu():
    lin = torch.nn.Linear(8, 4)
    w = torch.randn(4, 8)
    weights.set_weight(lin, w)
    assert torch.equal(weights.weight_of(lin), w) and not weights.weight_of(lin).requires_grad
    assert weights.offload_map(lin) is None and weights.weight_device(lin) == torch.device("cpu")
    half = torch.nn.Linear(8, 4).half()  # written in the module's own dtype
    weights.set_weight(half, w)
    assert weights.weight_of(half).dtype == torch.float16 and torch.equal(weights.weight_of(half), w.half())
    assert weights.input_device(tiny_llama()) == torch.device("cpu")


def test_device_room_is_never_on_the_cpu():
    assert not weights.device_room("cpu", 0, 0.0)
    assert not weights.device_room(torch.device("cpu"), 1, 0.5)
    if not torch.cuda.is_available():
        assert weights.capped_memory() is None  # no GPU: accelerate's max_memory stays its own


def test_offloaded_weights_are_read_and_written_through_the_offload_map():
    """accelerate's cpu_offload leaves the weights on the meta device between forwards; reads, writes,
    rounding and copies go through the hook's weights map, and the forward computes with them."""
    from accelerate import cpu_offload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    w0, b0, b1 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[1].bias))
    x = torch.randn(2, 8)
    cpu_offload(model, execution_device=torch.device("cpu"))
    lin = model[1]
    assert lin.weight.device.type == "meta" and weights.offload_map(lin) is not None
    assert weights.weight_device(lin) == torch.device("cpu")  # where it computes
    new = torch.randn(4, 8)
    weights.set_weight(lin, new)
    assert torch.equal(weights.weight_of(lin), new) and lin.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.allclose(model(x), F.linear(F.linear(x, w0, b0), new, b1), atol=1e-6)
    weights.round_params(model, torch.bfloat16)  # bfloat16 values, kept in float32
    got = weights.weight_of(lin)
    assert got.dtype == torch.float32 and torch.equal(got, new.bfloat16().float())
    copy = weights.detached_copy(lin, torch.device("cpu"))  # no hooks, weights loaded from the map
    assert not hasattr(copy, "_hf_hook") and torch.equal(copy.weight, got)
    swapped = weights.detached_copy(lin, torch.device("cpu"), {"weight": torch.zeros(4, 8)})
    assert not swapped.weight.any() and torch.equal(weights.weight_of(lin), got)  # the original untouched


def test_device_room_obeys_the_device_memory_cap(monkeypatch):
    """device_memory_gb=80 on a 141 GB card: the caches that fill free memory plan within 80 GB
    (torch's per-process fraction), not within what the driver reports free."""
    import torch

    from quantfix import loading as loading_mod, weights as weights_mod

    GB = 10 ** 9
    state = {"fraction": 1.0, "allocated": 60 * GB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (81 * GB, 141 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda dev=None: state["fraction"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 141 * GB})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, i=None: state.__setitem__("fraction", f))
    dev = torch.device("cuda", 0)
    assert weights_mod.device_room(dev, 30 * GB, 0.25)  # whole card: 81 - 30 = 51 >= 35.25
    weights_mod.cap_device_memory(80)
    assert abs(state["fraction"] - 80 / 141) < 1e-9
    assert not weights_mod.device_room(dev, 30 * GB, 0.25)  # capped: 80 - 60 - 30 < 0
    assert weights_mod.device_room(dev, 0, 0.25)  # 20 free of 80 >= 20
    assert not weights_mod.device_room(dev, 1 * GB, 0.25)
    assert not weights_mod.device_room("cpu", 0, 0.0)
    # model.device_map=auto: accelerate's weights stay within the cap (80 - 60 allocated), the rest to the host
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mm = loading_mod.placement_kwargs("auto")["max_memory"]
    assert mm[0] == 20 * GB and mm["cpu"] > 0
    assert loading_mod.placement_kwargs("auto", {"0": "10GiB"})["max_memory"] == {0: "10GiB"}  # the user's own wins
    state["fraction"] = 1.0
    assert "max_memory" not in loading_mod.placement_kwargs("auto")  # uncapped: accelerate's default


def test_offloaded_model_gives_the_same_run(compose, tiny_dir, tmp_path):
    """accelerate offload (the last resort for a model larger than the GPUs): with max_memory too
    small for the whole model, layers go to disk and sit on the meta device between forwards. The
    loop must read, swap and restore their weights through the offload map and reach exactly the
    result of the run with the model in memory, down to the exported checkpoint."""
    from tests.conftest import run_report as run

    common = {"quant.bits": 3, "quant.group_size": 0, "thresholds.max_ppl_increase_pct": "null",
              "thresholds.max_kld_mean": 0.002, "loop.ladder": "[3/0,8/0,16/0]", "loop.bits_step": 2.0,
              "loop.max_iters": 6, "export.dtype": "float16"}
    plain = run(compose(tiny_overrides(tiny_dir, tmp_path / "c1", **common)), tmp_path / "plain")
    off = run(compose(tiny_overrides(tiny_dir, tmp_path / "c2", **common, **{
        "model.device_map": "auto", "model.max_memory": "{cpu:300KB}",
        "model.offload_folder": str(tmp_path / "offload")})), tmp_path / "off")
    assert "placement" not in plain and off["placement"].get("disk", 0) >= 1, off.get("placement")
    # disk-offloaded weights are read from the model's own safetensors (same dtype): the folder may stay empty
    for a, b in zip(plain["iterations"], off["iterations"], strict=True):
        assert a["avg_bits"] == b["avg_bits"]
        assert a["metrics"]["kld_mean"] == pytest.approx(b["metrics"]["kld_mean"], rel=1e-4, abs=1e-7)
    assert off["final"]["passed"] and off["final"]["verified_metrics"]["ppl"] == pytest.approx(
        plain["final"]["verified_metrics"]["ppl"], rel=1e-5)
    dp, do = plain["diagnosis"], off["diagnosis"]
    assert dp["top_layers"] == do["top_layers"]
    assert [f["kind"] for f in dp["findings"]] == [f["kind"] for f in do["findings"]]
