"""Layer-wise execution (``quantfix.layerwise``) against the full forward pass."""
import torch

from quantfix.layerwise import capture_layer0_inputs, iterate_layers
from tests.conftest import tiny_llama


def test_layerwise_matches_full_forward():
    model = tiny_llama(seed=2, layers=3)
    x = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        full = model(x, output_hidden_states=True).hidden_states
    for i, _, inp in iterate_layers(model, capture_layer0_inputs(model, [x[:1], x[1:]])):
        got = torch.cat(inp.hidden)
        assert torch.allclose(got, full[i], atol=1e-5), i
