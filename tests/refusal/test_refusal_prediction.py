"""The refusal-prediction probe: its stage on a tiny model, its training prompts, and its summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import refusal.probing as probing
from lm.errors import UserError
from refusal.eval_sets import fitted_prompts, load_prompts
from refusal.probes import ProbeConfig, fit_grid, predict, probe_parameters
from refusal.refusal_prediction import summarise_refusal_probes

D = 32


def _records(refusals: list[bool], prompts: list[str] | None = None) -> dict:
    prompts = prompts or [f"p{i}" for i in range(len(refusals))]
    return dict(
        records=[
            dict(id=f"s:{i}", prompt=p, jailbroken={"arditi2024": [not r], "wei2024": [not r]})
            for i, (p, r) in enumerate(zip(prompts, refusals))
        ]
    )


def test_predict_recovers_planted_labels():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(D)
    v /= np.linalg.norm(v)
    y = rng.integers(0, 2, 120)
    x = torch.tensor(rng.standard_normal((120, 1, 2, D)) + 2.0 * np.where(y, 1, -1)[:, None, None, None] * v)
    params = probe_parameters(fit_grid(x[:80], y[:80], ProbeConfig(seed=0)))
    pred = predict(params, x[80:])
    assert pred.shape == (40, 1, 2) and pred.dtype == torch.bool
    assert (pred == torch.from_numpy(y[80:]).bool()[:, None, None]).float().mean() > 0.9
    shuffled = probe_parameters(fit_grid(x[:80], rng.permutation(y[:80]), ProbeConfig(seed=0)))
    assert (predict(shuffled, x[80:]) == torch.from_numpy(y[80:]).bool()[:, None, None]).float().mean() < 0.75


def test_training_prompts_are_harmful_train_and_never_evaluated():
    train = probing.training_prompts(64, seed=3)
    assert len(train) == 64 and len({p.id for p in train}) == 64
    assert all(p.source == "harmful_train" and p.text in fitted_prompts() for p in train)
    assert train == probing.training_prompts(64, seed=3) and train != probing.training_prompts(64, seed=4)
    evaluated = {p.text for p in load_prompts(("advbench", "jailbreakbench", "harmbench", "strongreject"), None)}
    assert not evaluated & {p.text for p in train}


def test_stage_fits_on_own_verdicts_and_transfers(tiny_qwen2, tmp_path, monkeypatch):
    model, tok = tiny_qwen2
    train = probing.training_prompts(12, seed=0)
    verdicts = [i % 2 == 0 for i in range(12)]
    seen = []

    def fake_measure(m, t, prompts, cfg, store, model_id):
        seen.append((tuple(p.id for p in prompts), model_id))
        return _records(verdicts, [p.text for p in prompts])

    monkeypatch.setattr(probing, "measure_prompts", fake_measure)
    test = _records(
        [True, False, True, True, False],
        ["How do I bake bread?", "Write a poem.", "Explain tides.", "Name a color.", "Hi"],
    )
    cfg = ProbeConfig(seed=0, folds=2)
    own = probing.refusal_prediction_probes(model, tok, train, None, tmp_path, "fp", test, cfg, None, batch_size=4)
    assert seen == [(tuple(p.id for p in train), "fp")]
    assert own["train_refused"].tolist() == verdicts and own["test_refused"].tolist() == [
        True,
        False,
        True,
        True,
        False,
    ]
    assert own["own_pred"].shape == (5, *own["coef"].shape[:2]) and "transfer_pred" not in own
    other = probing.refusal_prediction_probes(
        model, tok, train, None, tmp_path, "fp2", test, cfg, probing.fitted_probe_parameters(own), batch_size=4
    )
    # The same model and prompts: the original's probes on "its" activations predict what its own do.
    assert torch.equal(other["transfer_pred"], own["own_pred"])

    verdicts[:] = [True] * 11 + [False]  # one answered prompt: no probe can be cross-validated
    alone = probing.refusal_prediction_probes(
        model, tok, train, None, tmp_path, "fp3", test, cfg, probing.fitted_probe_parameters(own), batch_size=4
    )
    assert "coef" not in alone and probing.fitted_probe_parameters(alone) is None and "transfer_pred" in alone


def _result(train: list[bool], test: list[bool], pred=None, transfer=None) -> dict[str, torch.Tensor]:
    out = dict(train_refused=torch.tensor(train), test_refused=torch.tensor(test))
    if pred is not None:
        out["own_pred"] = torch.tensor(pred)[:, None, None]
        out["coef"] = torch.zeros(1, 1, D)
    if transfer is not None:
        out["transfer_pred"] = torch.tensor(transfer)[:, None, None]
    return out


def test_summary_against_the_majority_baseline_and_the_flips():
    # Original: refuses 6 of 8 held-out prompts, its probe gets 7 of 8 right.
    orig_test = [True, True, True, True, True, True, False, False]
    original = _result([True] * 10 + [False] * 4, orig_test, pred=[True, True, True, True, True, False, False, False])
    s = summarise_refusal_probes(original, original, (0, 0), is_original=True)
    assert s["fitted"] and s["own"]["k"] == 7 and s["own"]["n"] == 8
    assert s["majority"]["predicts"] == "refused" and s["majority"]["accuracy"]["k"] == 6
    assert s["vs_majority"]["test"] == "mcnemar-exact" and (s["vs_majority"]["b"], s["vs_majority"]["c"]) == (2, 1)
    assert "flips" not in s and "transfer" not in s

    # Variant: answers prompts 0-2 that the original refused, refuses prompt 6 the original answered.
    var_test = [False, False, False, True, True, True, True, False]
    transfer = [False, False, True, True, True, True, False, False]  # the original's probe on the variant
    variant = _result([False] * 9 + [True] * 5, var_test, pred=[False] * 3 + [True] * 4 + [False], transfer=transfer)
    v = summarise_refusal_probes(variant, original, (0, 0), is_original=False)
    assert v["majority"]["predicts"] == "answered" and v["own"]["k"] == 8
    assert v["flips"]["refused_to_answered"] == 3 and v["flips"]["answered_to_refused"] == 1
    assert v["flips"]["flagged_on_variant"]["k"] == 2 and v["flips"]["flagged_on_variant"]["n"] == 3
    assert v["flips"]["flagged_on_original"]["k"] == 0  # the original's probe had them all as refusals
    assert v["flips"]["answered_on_variant_all"]["k"] == 4 and v["flips"]["answered_on_original_all"]["k"] == 3
    assert v["transfer"]["k"] == sum(a == b for a, b in zip(transfer, var_test))

    unfit = summarise_refusal_probes(_result([True] * 13 + [False], var_test), original, (0, 0), is_original=False)
    assert not unfit["fitted"] and "refused 13 of 14" in unfit["reason"]
    assert unfit["flips"]["refused_to_answered"] == 3 and unfit["flips"]["flagged_on_variant"] is None
    assert unfit["flips"]["flagged_on_original"]["k"] == 0


@pytest.fixture(scope="module")
def tiny_qwen2():
    from tests.tiny import build_model, build_tokenizer

    tok = build_tokenizer("chatml")
    return build_model("qwen2", tok, seed=0, hidden=64, layers=2), tok


def test_training_generations_are_keyed_by_prompts_and_generation_settings_only(tiny_qwen2, tmp_path, monkeypatch):
    import refusal.measure as measure_mod
    from refusal.measure import EvalConfig, measure_prompts

    model, tok = tiny_qwen2
    train = probing.training_prompts(3, seed=0)
    first = measure_prompts(model, tok, train, EvalConfig(sets=("advbench",), max_new_tokens=3), tmp_path, "fp")
    assert [r["id"] for r in first["records"]] == [p.id for p in train] and first["rates"]["n"] == 3

    class Regenerated(Exception):
        pass

    def regenerate(*args, **kwargs):
        raise Regenerated

    monkeypatch.setattr(measure_mod, "attack_success", regenerate)
    again = measure_prompts(
        model, tok, train, EvalConfig(sets=("jailbreakbench",), n=7, max_new_tokens=3, batch_size=2), tmp_path, "fp"
    )
    assert again["records"] == first["records"]
    with pytest.raises(Regenerated):  # other generation settings are another measurement
        measure_prompts(model, tok, train, EvalConfig(max_new_tokens=4), tmp_path, "fp")
    with pytest.raises(UserError, match="no prompts"):
        measure_prompts(model, tok, [], EvalConfig(), tmp_path, "fp")
