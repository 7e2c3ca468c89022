"""The measurement service: per-prompt records, one cache key per measurement, paired tests, perplexity windows."""

from __future__ import annotations

import math

import pytest
import torch

import refusal.measure as measure_module
from lm.cache import measurement_key
from lm.perplexity import PerplexityConfig, measure_perplexity, perplexity, window_nll
from lm.zero_shot import ZeroShotConfig
from refusal.measure import EvalConfig, measure, outcomes, paired, rates
from tests.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer("chatml")
    return build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2), tokenizer


def test_keys_come_from_the_settings_and_ignore_batching():
    a = measurement_key("fp", EvalConfig(batch_size=4))
    assert a == measurement_key("fp", EvalConfig(batch_size=None))
    assert a != measurement_key("fp", EvalConfig(max_new_tokens=64)) and a != measurement_key("other", EvalConfig())
    assert measurement_key("fp", ZeroShotConfig(batch_size=1)) == measurement_key("fp", ZeroShotConfig(batch_size=8))
    assert measurement_key("fp", PerplexityConfig(batch_size=1)) == measurement_key("fp", PerplexityConfig())


def test_records_per_prompt_and_one_generation_per_measurement(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = EvalConfig(n=2, max_new_tokens=3)
    first = measure(model, tok, cfg, tmp_path, "fp")
    assert [r["id"] for r in first["records"]] == ["advbench:0", "advbench:1", "jailbreakbench:0", "jailbreakbench:1"]
    for r in first["records"]:
        assert set(r["jailbroken"]) == set(r["refused"]) == {"wei2024", "arditi2024"} and len(r["completions"]) == 1
    assert first["rates"]["asr"]["arditi2024"]["n"] == 4 and set(first["rates"]["per_source"]) == {
        "advbench",
        "jailbreakbench",
    }
    assert first["completions"] == [r["completions"][0] for r in first["records"]]

    monkeypatch.setattr(measure_module, "attack_success", lambda *a, **k: pytest.fail("generated again"))
    # Another entry point asking for the same measurement with another batch size: the same entry.
    again = measure(
        lambda: pytest.fail("model built"), tok, EvalConfig(n=2, max_new_tokens=3, batch_size=1), tmp_path, "fp"
    )
    assert again == first
    assert len(list((tmp_path / "generations-vanilla").glob("*.json"))) == 1


def test_paired_tests_match_prompts_by_id():
    def result(bits, ids=None):
        ids = ids or [f"s:{i}" for i in range(len(bits))]
        return dict(
            setting="vanilla",
            records=[
                dict(id=i, source="s", prompt=i, completions=["x"], jailbroken={"j": [b]}, refused={"j": [not b]})
                for i, b in zip(ids, bits)
            ],
        )

    a, b = result([True, True, True, False]), result([False, False, True, False])
    t = paired(a, b, "j")
    assert (t["b"], t["c"], t["n"]) == (2, 0, 4) and t["p_value"] == pytest.approx(0.5)
    assert paired(a, b, "j", "refused")["c"] == 2
    shuffled = dict(a, records=list(reversed(a["records"])))
    assert paired(shuffled, b, "j") == t
    with pytest.raises(ValueError, match="different prompts"):
        paired(a, result([True] * 4, ["t:0", "t:1", "t:2", "t:3"]), "j")


def test_adv_suffix_uses_the_best_suffix_and_adv_decoding_clusters():
    records = [
        dict(
            id=f"s:{i}",
            source="s",
            prompt="p",
            completions=["a", "b"],
            jailbroken={j: [False, i < 3] for j in ("wei2024", "arditi2024")},
            refused={j: [True, i >= 3] for j in ("wei2024", "arditi2024")},
        )
        for i in range(5)
    ]
    r = rates(dict(setting="adv_suffix", records=records))
    assert (
        r["asr"]["arditi2024"]["k"] == 3
        and r["asr"]["arditi2024"]["n"] == 5
        and "best of the suffixes" in r["asr"]["arditi2024"]["method"]
    )
    assert outcomes(dict(setting="adv_suffix", records=records), "wei2024") == {f"s:{i}": i < 3 for i in range(5)}
    sampled = rates(dict(setting="adv_decoding", records=records))
    assert (
        sampled["asr"]["wei2024"]["value"] == pytest.approx(3 / 10)
        and sampled["asr"]["wei2024"]["method"] == "bootstrap-prompts"
    )
    assert (
        paired(dict(setting="adv_decoding", records=records), dict(setting="adv_decoding", records=records), "wei2024")
        is None
    )


def test_judge_disagreement_is_counted_with_examples():
    records = [
        dict(
            id="s:0",
            source="s",
            prompt="p",
            completions=["short"],
            jailbroken={"wei2024": [False], "arditi2024": [True]},
            refused={"wei2024": [False], "arditi2024": [False]},
        ),
        dict(
            id="s:1",
            source="s",
            prompt="q",
            completions=["I cannot"],
            jailbroken={"wei2024": [False], "arditi2024": [False]},
            refused={"wei2024": [True], "arditi2024": [True]},
        ),
    ]
    d = rates(dict(setting="vanilla", records=records))["judge_disagreement"]
    assert (d["rate"]["k"], d["rate"]["n"]) == (1, 2) and d["examples"][0]["id"] == "s:0"


def test_perplexity_windows_match_a_direct_computation(tiny):
    model, tok = tiny
    text = " ".join(f"word{i % 37} and more text {i}" for i in range(400))
    w = window_nll(model, tok, n_windows=3, seqlen=32, text=text, batch_size=2)
    assert len(w["nll"]) == 3 and w["tokens"] == [31, 31, 31]
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][: 3 * 32].view(3, 32)
    with torch.no_grad():
        direct = [float(model(input_ids=row[None], labels=row[None]).loss) for row in ids]  # mean NLL of one window
    assert [n / t for n, t in zip(w["nll"], w["tokens"])] == pytest.approx(direct, rel=1e-5)
    assert perplexity(model, tok, 3, 32, text=text) == pytest.approx(math.exp(sum(direct) / 3), rel=1e-5)


def test_stored_perplexity_keeps_its_windows(tiny):
    model, tok = tiny
    p = measure_perplexity(model, tok, PerplexityConfig(windows=2, seqlen=16))
    assert len(p["window_nll"]) == 2 and p["perplexity"] == pytest.approx(
        math.exp(sum(p["window_nll"]) / sum(p["window_tokens"]))
    )
    assert measure_module.perplexity_rate(p)["n"] == 2


def test_paired_utility_tests_match_windows_and_documents():
    from refusal.measure import paired_perplexity, paired_zero_shot

    zs = lambda docs: dict(per_task={t: dict(per_document=d) for t, d in docs.items()})
    a = zs(dict(boolq=[1.0, 1.0, 0.0], rte=[1.0, 0.0]))
    b = zs(dict(boolq=[0.0, 1.0, 0.0], rte=[0.0, 1.0]))
    t = paired_zero_shot(a, b)
    assert (t["test"], t["b"], t["c"], t["n"]) == ("mcnemar-exact", 2, 1, 5)  # pooled over both tasks
    assert paired_zero_shot(a, None) is None
    assert paired_zero_shot(a, zs(dict(boolq=[1.0, 1.0, 0.0], rte=None))) is None  # a measurement without documents
    with pytest.raises(ValueError, match="different documents"):
        paired_zero_shot(a, zs(dict(boolq=[1.0], rte=[1.0, 0.0])))

    p = dict(window_nll=[700.0, 650.0], window_tokens=[511, 511])
    q = dict(window_nll=[690.0, 640.0], window_tokens=[511, 511])
    r = paired_perplexity(p, q)
    assert r["ratio"] == pytest.approx(math.exp(20 / 1022)) and r["n"] == 2
    assert paired_perplexity(p, dict(perplexity=40.0)) is None
    with pytest.raises(ValueError, match="different windows"):
        paired_perplexity(p, dict(q, window_tokens=[511, 400]))
