"""One way to measure a model state's held-out behaviour (refusal.behaviour), shared by every entry point."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

import refusal.measure as measure_module
from lm.perplexity import PerplexityConfig
from refusal.behaviour import BehaviourConfig, measure_behaviour
from refusal.measure import EvalConfig, measure
from tests.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer("chatml")
    return build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2), tokenizer


def _config(**kw) -> BehaviourConfig:
    asr = EvalConfig(n=1, max_new_tokens=2)
    return BehaviourConfig(
        **{
            "asr": asr,
            "harmless": asr.harmless(n=1),
            "perplexity": PerplexityConfig(windows=1, seqlen=16),
            **kw,
        }
    )


def test_behaviour_measures_each_part_once_and_a_rerun_builds_no_model(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    stages = []

    def stage(name):
        stages.append(name)
        return nullcontext()

    first = measure_behaviour(model, tok, _config(), tmp_path, "fp", stage=stage)
    assert stages == ["ASR", "over-refusal", "perplexity"]
    assert set(first.asr) == {"vanilla"} and first.zero_shot is None
    assert first.harmless["rates"]["asr"]["arditi2024"]["n"] == 1 and first.perplexity["perplexity"] > 0
    assert list(first.to_json()) == ["asr_vanilla", "harmless", "perplexity"]
    # The same measurement asked for directly is the stored one: the entry points share it.
    assert measure(model, tok, EvalConfig(n=1, max_new_tokens=2), tmp_path, "fp") == first.asr["vanilla"]

    monkeypatch.setattr(measure_module, "attack_success", lambda *a, **k: pytest.fail("generated again"))
    again = measure_behaviour(lambda: pytest.fail("model built"), tok, _config(), tmp_path, "fp")
    assert again == first


def test_behaviour_leaves_out_what_its_config_leaves_out(tiny, tmp_path):
    model, tok = tiny
    only_asr = measure_behaviour(model, tok, _config(harmless=None, perplexity=None), tmp_path, "fp")
    assert only_asr.harmless is None and only_asr.perplexity is None
    assert list(only_asr.to_json()) == ["asr_vanilla"]


def test_each_asr_setting_is_its_own_measurement(tiny, tmp_path):
    model, tok = tiny
    cfg = _config(settings=("vanilla", "adv_suffix"), harmless=None, perplexity=None)
    result = measure_behaviour(model, tok, cfg, tmp_path, "fp")
    assert result.asr["vanilla"]["setting"] == "vanilla" and result.asr["adv_suffix"]["setting"] == "adv_suffix"
    assert {p.name for p in tmp_path.iterdir()} == {"generations-vanilla", "generations-adv_suffix"}
