"""Task metrics (lambada_openai, arc_easy, piqa) scored like lm-evaluation-harness, on the tiny model."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from quantfix.config import EvalConfig
import torch
import torch.nn.functional as F

from quantfix import tasks
from quantfix.errors import QuantfixError
from quantfix.tasks import TaskResult, compare, encode_pair, load_docs, loglikelihoods, score_task
from tests.conftest import SHARED_DATA, tiny_llama, tiny_tokenizer

DATA = str(SHARED_DATA)
needs_data = pytest.mark.skipif(not (SHARED_DATA / "arc_easy").is_dir(), reason="shared data not present")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ------------------------------------------------------------------------------------------ docs

@needs_data
def test_lambada_docs_split_last_word():
    docs = load_docs("lambada_openai", DATA)
    assert len(docs) == 5153
    d = docs[0]
    assert d["continuation"] == " signs"
    assert d["context"].endswith("I don't care about")
    raw = json.loads(open(SHARED_DATA / "lambada_openai" / "lambada_test.jsonl").readline())["text"]
    assert d["context"] + d["continuation"] == raw
    assert docs[1]["continuation"] == " Shane" and docs[1]["context"].endswith("on my own,")


@needs_data
def test_arc_docs_gold_from_answer_key():
    docs = load_docs("arc_easy", DATA)
    assert len(docs) == 2376
    assert docs[0]["context"] == ("Question: Which statement best explains why photosynthesis is the foundation "
                                  "of most food webs?\nAnswer:")
    assert docs[0]["gold"] == 0 and docs[0]["choices"][0].startswith("Sunlight")
    assert docs[1]["gold"] == 1 and docs[1]["choices"][1] == "breathing mask"  # answerKey B
    # numeric labels: answerKey "2" of labels ["1".."4"] is index 1
    assert docs[14]["choices"] == ["air", "elements", "water", "soil"] and docs[14]["gold"] == 1
    assert {len(d["choices"]) for d in docs} == {3, 4, 5}


@needs_data
def test_piqa_docs_gold_from_labels_file():
    docs = load_docs("piqa", DATA)
    assert len(docs) == 1838
    assert docs[0]["context"] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert docs[0]["gold"] == 0 and docs[0]["choices"][0].endswith("ripped paper strips, you will also need to "
                                                                   "supply it with a water bottle and a food dish.")
    assert docs[1]["gold"] == 1 and docs[1]["choices"] == ["replace drawer with bobby pin ",
                                                           "finish, woodgrain with  bobby pin "]
    labels = (SHARED_DATA / "piqa" / "valid-labels.lst").read_text().split()
    assert [d["gold"] for d in docs] == [int(x) for x in labels]


@needs_data
def test_limit_is_a_seeded_sorted_subset():
    a = load_docs("arc_easy", DATA, limit=20, seed=3)
    b = load_docs("arc_easy", DATA, limit=20, seed=3)
    c = load_docs("arc_easy", DATA, limit=20, seed=4)
    ids = [d["index"] for d in a]
    assert ids == [d["index"] for d in b] and ids == sorted(ids) and len(set(ids)) == 20
    assert ids != [d["index"] for d in c]
    assert ids != list(range(20))  # random, not the first docs
    full = load_docs("arc_easy", DATA)
    assert all(full[d["index"]] == d for d in a)
    assert len(load_docs("piqa", DATA, limit=0)) == 1838 and len(load_docs("piqa", DATA, limit=10 ** 6)) == 1838
    with pytest.raises(QuantfixError, match="limit"):
        load_docs("piqa", DATA, limit=-1)


def test_paths_override_and_piqa_label_field(tmp_path):
    f = tmp_path / "my_piqa.jsonl"
    f.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 1}) + "\n")
    docs = load_docs("piqa", "/nonexistent", paths={"piqa": str(f)})
    assert docs == [{"index": 0, "context": "Question: g\nAnswer:", "choices": ["a", "b"], "gold": 1}]
    g = tmp_path / "lam.jsonl"
    g.write_text('{"text": "one two three"}\n\n{"text": "four five"}\n')
    assert [d["continuation"] for d in load_docs("lambada_openai", "/x", paths={"lambada_openai": str(g)})] == \
        [" three", " five"]


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(QuantfixError) as e:
        load_docs("arc_easy", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "arc_easy" / "ARC-Easy-test.jsonl") in msg
    assert "data_dir=" in msg and "eval.task_paths.arc_easy=" in msg and "\n" not in msg
    with pytest.raises(QuantfixError, match="labels file not found"):
        (tmp_path / "v.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
        load_docs("piqa", "/x", paths={"piqa": str(tmp_path / "v.jsonl")})
    with pytest.raises(QuantfixError, match="local tasks"):
        load_docs("hellaswag", str(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\n{oops\n')
    with pytest.raises(QuantfixError, match=r"bad.jsonl:2: not valid JSON"):
        load_docs("lambada_openai", "/x", paths={"lambada_openai": str(tmp_path / "bad.jsonl")})


# ------------------------------------------------------------------------------- log-likelihood

def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = encode_pair(tok, "Question: x\nAnswer: ", "yes")
    assert ctx == tok.encode("Question: x\nAnswer:")
    assert ctx + cont == tok.encode("Question: x\nAnswer: yes")
    assert tok.decode(cont) == " yes"


def _direct(model, tok, context, continuation):
    """Per-request reference: one unpadded forward of context+continuation, log-softmax gathered."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    pos = torch.arange(len(ctx) - 1, len(whole) - 1)
    tgt = torch.tensor(cont)
    return float(logp[pos, tgt].sum()), bool((logp[pos].argmax(-1) == tgt).all())


@needs_data
def test_loglikelihood_matches_direct_computation(model, tok):
    docs = load_docs("arc_easy", DATA, limit=4, seed=1) + load_docs("lambada_openai", DATA, limit=2)
    reqs = [(d["context"], " " + c) for d in docs[:4] for c in d["choices"]]
    reqs += [(d["context"], d["continuation"]) for d in docs[4:]]
    got = loglikelihoods(model, tok, reqs, batch_size=5, progress=False)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        ref_ll, ref_greedy = _direct(model, tok, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    # batching (padding, order) does not change the result
    one = loglikelihoods(model, tok, reqs, batch_size=1, progress=False)
    assert [x[0] for x in one] == pytest.approx([x[0] for x in got], abs=1e-4)


def test_greedy_flag_true_for_argmax_continuation(model, tok):
    # continue a context greedily by 3 tokens; find a case whose text re-encodes to the same tokens
    for context in ("The quick brown fox", "def foo(x):", "Answer: the", "It is a"):
        ids = tok.encode(context)
        with torch.no_grad():
            for _ in range(3):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        cont_text = tok.decode(ids[len(tok.encode(context)):])
        if cont_text and not cont_text[0].isspace() and tok.encode(context + cont_text) == ids:
            (ll, greedy), = loglikelihoods(model, tok, [(context, cont_text)], progress=False)
            assert greedy and ll == pytest.approx(_direct(model, tok, context, cont_text)[0], abs=1e-4)
            # one changed token is no longer greedy
            other = [(context, cont_text[:-1] + ("a" if cont_text[-1] != "a" else "b"))]
            assert not loglikelihoods(model, tok, other, progress=False)[0][1]
            return
    pytest.skip("no context whose greedy continuation round-trips through the tokenizer")


def test_context_truncated_from_the_left_like_lm_eval(model, tok):
    ctx, cont = "word " * 400 + "end", " of it"
    ll = loglikelihoods(model, tok, [(ctx, cont)], progress=False)[0][0]
    c, k = encode_pair(tok, ctx, cont)
    assert len(c) + len(k) > 513  # longer than max_position_embeddings + 1
    inp = (c + k)[-513:]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([inp[:-1]])).logits[0].float(), -1)
    ref = float(logp[-len(k):].gather(1, torch.tensor(k)[:, None]).sum())
    assert ll == pytest.approx(ref, abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
@needs_data
def test_loglikelihood_equals_lm_eval_hflm(model, tok):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    docs = load_docs("arc_easy", DATA, limit=5, seed=2)
    reqs = [(d["context"], " " + c) for d in docs for c in d["choices"]]
    reqs += [("Answer: ", "yes"), ("", " no context")]  # trailing space moved; empty context -> BOS
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    ref = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                            for i, r in enumerate(reqs)], disable_tqdm=True)
    got = loglikelihoods(model, tok, reqs, batch_size=3, progress=False)
    for (ll, greedy), (rll, rgreedy) in zip(got, ref):
        assert ll == pytest.approx(rll, abs=1e-4) and greedy == rgreedy


# ---------------------------------------------------------------------------------------- metrics

def test_acc_norm_divides_by_choice_characters():
    # raw argmax picks the short choice; per-character normalisation picks the long one
    s = tasks.multiple_choice_scores([-10.0, -12.0], ["short", "a much longer choice"], gold=1)
    assert s == {"acc": 0.0, "acc_norm": 1.0}
    # length is of the choice text itself (the leading " " of the continuation is not counted)
    s = tasks.multiple_choice_scores([-4.0, -5.0], ["abcd", "abcde"], gold=0)
    assert s == {"acc": 1.0, "acc_norm": 1.0}  # -1.0 vs -1.0: tie -> first, like np.argmax
    s = tasks.multiple_choice_scores([-4.0, -5.0], ["abc", "abcde"], gold=1)
    assert s == {"acc": 0.0, "acc_norm": 1.0}  # -1.33 vs -1.0


@needs_data
def test_score_task_multiple_choice(model, tok):
    docs = load_docs("arc_easy", DATA, limit=6, seed=5)
    r = score_task(model, tok, "arc_easy", docs, batch_size=4, progress=False)
    assert r.n == 6 and r.doc_ids == [d["index"] for d in docs]
    for i, d in enumerate(docs):
        lls = [_direct(model, tok, d["context"], " " + c)[0] for c in d["choices"]]
        assert r.per_doc["acc"][i] == float(max(range(len(lls)), key=lls.__getitem__) == d["gold"])
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"])]
        assert r.per_doc["acc_norm"][i] == float(max(range(len(norm)), key=norm.__getitem__) == d["gold"])
    for m in ("acc", "acc_norm"):
        v = r.per_doc[m]
        assert r.metrics[m] == pytest.approx(sum(v) / 6)
        mu = sum(v) / 6
        assert r.stderr[m] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in v) / 5) / math.sqrt(6))


@needs_data
def test_lambada_perplexity_and_acc(model, tok):
    docs = load_docs("lambada_openai", DATA, limit=4, seed=0)
    r = score_task(model, tok, "lambada_openai", docs, batch_size=2, progress=False)
    direct = [_direct(model, tok, d["context"], d["continuation"]) for d in docs]
    assert r.metrics["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in direct) / 4), rel=1e-4)
    assert r.per_doc["acc"] == [float(g) for _, g in direct]
    assert r.metrics["acc"] == sum(r.per_doc["acc"]) / 4
    assert set(r.per_doc) == {"acc"} and r.stderr["perplexity"] > 0


def test_score_task_rejects_bad_input(model, tok):
    with pytest.raises(QuantfixError, match="no documents"):
        score_task(model, tok, "piqa", [], progress=False)
    with pytest.raises(QuantfixError, match="local tasks only"):
        score_task(model, tok, "hellaswag", [{"context": "a"}], progress=False)


def test_non_local_task_without_lm_eval(monkeypatch, model, tok):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(QuantfixError, match=r"task hellaswag is not a local task \(lambada_openai, arc_easy, "
                                            r"piqa\) and lm-eval is not installed: pip install lm-eval"):
        tasks.score_tasks(model, tok, ["arc_easy", "hellaswag"], DATA, EvalConfig(task_limit=2))


def test_lm_eval_results_conversion():
    out = {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                     "acc_norm,none": 0.75, "acc_norm_stderr,none": "N/A", "sample_len": 2}},
           "samples": {"hellaswag": [{"doc_id": 1, "acc": 1.0, "acc_norm": 1.0},
                                     {"doc_id": 0, "acc": 0.0, "acc_norm": 0.5}]},
           "n-samples": {"hellaswag": {"original": 100, "effective": 2}}}
    r = tasks._from_lm_eval("hellaswag", out, 3.0)
    assert r.metrics == {"acc": 0.5, "acc_norm": 0.75} and r.stderr["acc"] == 0.1
    assert math.isnan(r.stderr["acc_norm"])
    assert r.per_doc == {"acc": [0.0, 1.0]} and r.doc_ids == [0, 1] and r.n == 2


# ---------------------------------------------------------------------------------------- compare

def _result(per_doc, ids=None):
    n = len(per_doc)
    return TaskResult("arc_easy", {"acc_norm": sum(per_doc) / n}, {"acc_norm": tasks.mean_stderr(per_doc)},
                      {"acc_norm": list(per_doc)}, n, 1.0, list(ids if ids is not None else range(n)))


def test_compare_flags_large_drop():
    base = [1.0] * 60 + [0.0] * 40
    quant = [1.0] * 40 + [0.0] * 60  # 20 docs flipped right -> wrong
    c = compare(_result(base), _result(quant), "acc_norm", max_drop_points=2.0)
    assert c["base"] == pytest.approx(60.0) and c["quant"] == pytest.approx(40.0) and c["delta"] == pytest.approx(-20.0)
    # paired stderr: std of the differences (20 ones, 80 zeros) / sqrt(100), in points
    assert c["stderr"] == pytest.approx(100 * math.sqrt(0.16 * 100 / 99) / 10)
    assert c["failed"] and not c["within_noise"] and "paired" in c["reason"]


def test_compare_drop_within_noise_passes():
    base = [1.0, 0.0] * 25
    quant = list(base)
    quant[0], quant[2], quant[3] = 0.0, 0.0, 1.0  # net 1 doc of 50: a 2-point drop
    c = compare(_result(base), _result(quant), "acc_norm", max_drop_points=1.0)
    assert c["delta"] == pytest.approx(-2.0) and c["stderr"] > 1.0
    assert c["within_noise"] and not c["failed"] and "within noise" in c["reason"]
    # same numbers, tolerance not exceeded
    assert not compare(_result(base), _result(quant), "acc_norm", max_drop_points=5.0)["failed"]


def test_compare_unpaired_fallback():
    base, quant = _result([1.0] * 70 + [0.0] * 30), _result([1.0] * 50 + [0.0] * 50)
    quant.per_doc = {}  # e.g. from lm-eval without samples
    c = compare(base, quant, "acc_norm", max_drop_points=1.0)
    se = 100 * math.sqrt(base.stderr["acc_norm"] ** 2 + quant.stderr["acc_norm"] ** 2)
    assert c["stderr"] == pytest.approx(se) and "unpaired" in c["reason"] and c["failed"]
    # different doc subsets are not paired either
    other = _result([1.0] * 50 + [0.0] * 50, ids=range(100, 200))
    assert "unpaired" in compare(base, other, "acc_norm", 1.0)["reason"]


def test_compare_perplexity_increase_and_missing_metric():
    base = TaskResult("lambada_openai", {"acc": 0.4, "perplexity": 20.0}, {"acc": 0.02, "perplexity": 1.0},
                      {"acc": []}, 500, 1.0)
    quant = TaskResult("lambada_openai", {"acc": 0.38, "perplexity": 30.0}, {"acc": 0.02, "perplexity": 1.5},
                       {"acc": []}, 500, 1.0)
    c = compare(base, quant, "perplexity", max_drop_points=5.0)
    assert c["delta"] == 10.0 and c["failed"]
    with pytest.raises(QuantfixError, match="no metric 'acc_norm'"):
        compare(base, quant, "acc_norm", 1.0)


def test_task_result_round_trip():
    r = _result([1.0, 0.0, 1.0])
    assert TaskResult.from_dict(r.to_dict(per_doc=True)).per_doc == r.per_doc
    d = r.to_dict()
    assert "per_doc" not in d and d["metrics"]["acc_norm"] == pytest.approx(2 / 3, abs=1e-6)
    json.dumps(d)


def test_task_metrics_never_pass_when_nonfinite():
    from quantfix import tasks as tasks_mod

    assert tasks_mod.multiple_choice_scores([float("nan"), -1.0], ["a", "b"], 0) == {"acc": 0.0, "acc_norm": 0.0}
    base = tasks_mod.TaskResult("lambada_openai", {"acc": 0.5, "perplexity": 20.0}, {"acc": 0.1, "perplexity": 1.0},
                                {}, 10, 1.0)
    quant = tasks_mod.TaskResult("lambada_openai", {"acc": 0.5, "perplexity": float("nan")},
                                 {"acc": 0.1, "perplexity": float("nan")}, {}, 10, 1.0)
    c = tasks_mod.compare(base, quant, "perplexity", max_drop_points=1e9)
    assert c["failed"] and "quantized perplexity is nan (non-finite)" in c["reason"]
    assert not tasks_mod.compare(base, base, "perplexity", max_drop_points=1e9)["failed"]
