"""Run a decoder one layer at a time over a fixed set of batches.

The inputs of layer 0 (hidden states and the layer's keyword arguments: position embeddings,
masks) are captured once; each layer then runs on all batches before the next one starts. Only
one layer's activations are live at a time, which is what lets calibration statistics and
per-layer diagnostics scale to models much larger than the calibration set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from quantfix.arch import decoder_layers

from quantfix.weights import input_device


class _Captured(Exception):
    pass


@dataclass
class LayerInputs:
    hidden: List[torch.Tensor]  # one [batch, seq, hidden] tensor per batch
    kwargs: List[Dict[str, Any]]  # the layer's keyword arguments per batch
    # a caller that ran the layer, unchanged, on every batch may leave its outputs here: they are
    # the next layer's inputs, and the layer is not run a second time
    outputs: Optional[List[torch.Tensor]] = None


@torch.no_grad()
def capture_layer0_inputs(model, batches: List[torch.Tensor]) -> LayerInputs:
    layer0 = decoder_layers(model)[0]
    hidden, kwargs = [], []

    def hook(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(input_device(model)), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, kwargs)


def layer_output(layer, hidden: torch.Tensor, kwargs: Dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def iterate_layers(model, inputs: LayerInputs) -> Iterator[Tuple[int, torch.nn.Module, LayerInputs]]:
    """Yield (index, layer, inputs of that layer); after the caller is done with a layer, its
    outputs (computed with the layer as it is then) become the next layer's inputs."""
    current = inputs
    for i, layer in enumerate(decoder_layers(model)):
        yield i, layer, current
        outs = current.outputs if current.outputs is not None and len(current.outputs) == len(current.hidden) else \
            [layer_output(layer, h, kw) for h, kw in zip(current.hidden, current.kwargs)]
        current = LayerInputs(outs, current.kwargs)
