"""Probe generations (``quantfix.diagnose.probes``): batched generation equals one prompt at a time,
and the helpers that read the text (repetition and character loops, divergence, refusals)."""
from quantfix.diagnose import probes
from tests.conftest import tiny_llama


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


def test_char_loops_are_repetition_loops():
    assert probes.char_loop("The answer is P.S.I.E.S.A.L.A.L.A.L.A.L.A.")
    assert probes.char_loop("ok ok ok ok ok ok")
    assert not probes.char_loop("The capital of France is Paris, a city on the Seine.")
    assert not probes.char_loop("aaa")  # too short to call
