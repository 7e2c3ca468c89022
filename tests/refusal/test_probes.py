"""refusal.probes on synthetic activations with a planted direction, and per-prompt activations on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lm.errors import UserError
from refusal.direction import mean_activations, prompt_activations
from refusal.probes import (
    ProbeConfig,
    best_cell,
    direction_cosines,
    fit_probe,
    fit_probe_grid,
    grid_accuracy,
    probe_direction,
)

D = 48


def _planted(seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(D)
    return v / np.linalg.norm(v)


def _acts(n: int, shift: float, seed: int, direction: np.ndarray, shape=(2, 3)) -> torch.Tensor:
    """Unit Gaussian noise plus `shift` along `direction` at every (position, layer)."""
    x = np.random.default_rng(seed).standard_normal((n, *shape, D)) + shift * direction
    return torch.tensor(x, dtype=torch.float32)


def test_probe_finds_a_planted_direction():
    v = _planted()
    probes = fit_probe_grid(_acts(96, 1.5, 1, v), _acts(96, -1.5, 2, v))
    accuracy = grid_accuracy(probes, _acts(100, 1.5, 3, v), _acts(100, -1.5, 4, v))
    # Means 3 apart along v with unit noise: the Bayes accuracy is Phi(1.5) = 0.933.
    for row in accuracy:
        for a in row:
            assert a["n"] == 200 and a["ci95"][0] > 0.8 and a["method"] == "wilson"
    cosines = direction_cosines(probes, torch.tensor(np.broadcast_to(v, (2, 3, D)).copy()))
    assert (cosines > 0.7).all(), cosines
    # A random direction is nearly orthogonal to the probes (|cos| ~ 1/sqrt(D) = 0.14).
    other = torch.tensor(np.broadcast_to(_planted(9), (2, 3, D)).copy())
    assert (direction_cosines(probes, other).abs() < 0.4).all()


def test_probe_on_shuffled_labels_is_at_chance():
    v = _planted()
    x = torch.cat([_acts(96, 1.5, 1, v, (1, 1)), _acts(96, -1.5, 2, v, (1, 1))])[:, 0, 0].double().numpy()
    y = np.random.default_rng(5).permutation(np.r_[np.ones(96, dtype=int), np.zeros(96, dtype=int)])
    probe = fit_probe(x, y)
    test = torch.cat([_acts(100, 1.5, 3, v, (1, 1)), _acts(100, -1.5, 4, v, (1, 1))])[:, 0, 0].double().numpy()
    truth = np.r_[np.ones(100, dtype=int), np.zeros(100, dtype=int)]
    accuracy = float((probe.predict(test) == truth).mean())
    assert 0.35 < accuracy < 0.65, accuracy


def test_probe_direction_is_the_gradient_of_the_decision_in_the_residual_basis():
    """With features on very different scales, the weight vector must have the scaling undone."""
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(-2, 2, D))
    v = _planted()
    x = (np.r_[rng.standard_normal((80, D)) + v, rng.standard_normal((80, D)) - v]) * scales
    y = np.r_[np.ones(80, dtype=int), np.zeros(80, dtype=int)]
    probe = fit_probe(x, y)
    w = probe_direction(probe)
    eps = 1e-3
    grad = np.array(
        [(probe.decision_function(x[:1] + eps * e) - probe.decision_function(x[:1]))[0] / eps for e in np.eye(D)]
    )
    np.testing.assert_allclose(w, grad / np.linalg.norm(grad), atol=1e-6)


def test_same_settings_give_the_same_probe():
    v = _planted()
    a = fit_probe_grid(_acts(40, 1.0, 1, v, (1, 2)), _acts(40, -1.0, 2, v, (1, 2)))
    b = fit_probe_grid(_acts(40, 1.0, 1, v, (1, 2)), _acts(40, -1.0, 2, v, (1, 2)))
    for ra, rb in zip(a, b):
        for pa, pb in zip(ra, rb):
            np.testing.assert_array_equal(pa[-1].coef_, pb[-1].coef_)
            assert pa[-1].C_ == pb[-1].C_


def test_best_cell_prefers_accuracy_then_the_earliest_layer():
    def r(v):
        return dict(value=v)

    assert best_cell([[r(0.5), r(0.9), r(0.9)], [r(0.9), r(0.7), r(0.6)]]) == (1, 0)
    assert best_cell([[r(0.5), r(0.9)], [r(0.5), r(0.9)]]) == (0, 1)
    assert best_cell([[r(0.5), r(0.8)], [r(0.95), r(0.9)]]) == (1, 0)


def test_bad_probe_input_is_a_user_error():
    v = _planted()
    with pytest.raises(UserError, match="at least 2 examples of each class"):
        fit_probe(np.zeros((6, D)), np.r_[np.ones(5, dtype=int), np.zeros(1, dtype=int)])
    with pytest.raises(UserError, match="differ in shape"):
        fit_probe_grid(_acts(10, 1, 1, v, (1, 2)), _acts(10, -1, 2, v, (1, 3)))
    with pytest.raises(UserError, match="positive"):
        ProbeConfig(cs=(0.0,))
    with pytest.raises(UserError, match="2 folds"):
        ProbeConfig(folds=1)


def test_prompt_activations_are_in_input_order_and_average_to_the_mean(tiny_qwen2):
    from tests.refusal.test_selection import HARMFUL

    model, tokenizer = tiny_qwen2
    acts = prompt_activations(model, tokenizer, HARMFUL, batch_size=3)
    assert acts.shape[0] == len(HARMFUL) and acts.dtype == torch.float32
    torch.testing.assert_close(
        acts.double().mean(0).float(), mean_activations(model, tokenizer, HARMFUL, batch_size=3), atol=1e-5, rtol=1e-5
    )
    alone = prompt_activations(model, tokenizer, HARMFUL[2:3])
    torch.testing.assert_close(acts[2], alone[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="empty instruction set"):
        prompt_activations(model, tokenizer, [])


@pytest.mark.slow
def test_harmfulness_probe_at_the_embedded_models_source_generalises_to_held_out_prompts():
    """The original's probe at (-1, 14), fitted on 128 + 128 training instructions, separates 50
    held-out JailbreakBench behaviours from 50 held-out harmless instructions well above chance.
    Measured when written (2026-12-04): 100/100 correct, Wilson [0.963, 1]; cosine with the
    difference of means there 0.42."""
    from lm.datasets import instructions, sample
    from lm.loading import load_model
    from refusal.eval_sets import load_prompts

    torch.set_num_threads(2)
    lm = load_model("embedded")
    model, tok = lm.model, lm.tokenizer

    def acts(texts):
        return prompt_activations(model, tok, texts)[:, -1, 14]

    harmful, harmless = (
        acts(sample(instructions("harmful", "train"), 128, 42)),
        acts(sample(instructions("harmless", "train"), 128, 42)),
    )
    test_h = acts([p.text for p in load_prompts(("jailbreakbench",), 50)])
    test_s = acts([p.text for p in load_prompts(("alpaca",), 50)])
    probes = fit_probe_grid(harmful[:, None, None], harmless[:, None, None])
    accuracy = grid_accuracy(probes, test_h[:, None, None], test_s[:, None, None])[0][0]
    assert accuracy["n"] == 100 and accuracy["ci95"][0] > 0.8, accuracy
    cosine = float(direction_cosines(probes, (harmful.double().mean(0) - harmless.double().mean(0))[None, None])[0, 0])
    assert cosine > 0.2, cosine  # aligned with the refusal direction, though far from identical


def test_stored_parameters_predict_like_the_fitted_pipelines():
    """The tensors a run directory keeps give the sklearn pipelines' own predictions, so the
    original's probes can be applied to a variant's activations without refitting."""
    from refusal.probes import accuracy_grid, correct, probe_parameters

    rng = np.random.default_rng(3)
    v = _planted()
    scales = torch.tensor(np.exp(rng.uniform(-2, 2, D)), dtype=torch.float32)
    train_h, train_s = _acts(40, 0.7, 1, v) * scales, _acts(40, -0.7, 2, v) * scales
    test_h, test_s = _acts(30, 0.7, 3, v) * scales, _acts(30, -0.7, 4, v) * scales
    probes = fit_probe_grid(train_h, train_s)
    params = probe_parameters(probes)
    assert params["coef"].shape == (2, 3, D) and params["intercept"].shape == params["c"].shape == (2, 3)
    ok = correct(params, test_h, test_s)
    assert ok.shape == (60, 2, 3)
    x = torch.cat([test_h, test_s]).double().numpy()
    truth = np.r_[np.ones(30, dtype=int), np.zeros(30, dtype=int)]
    for p in range(2):
        for layer in range(3):
            np.testing.assert_array_equal(ok[:, p, layer].numpy(), probes[p][layer].predict(x[:, p, layer]) == truth)
    assert accuracy_grid(ok) == grid_accuracy(probes, test_h, test_s)
    with pytest.raises(UserError, match="probes of shape"):
        correct(params, test_h[:, :1], test_s[:, :1])


def test_the_probe_grid_limits_every_thread_pool_its_fits_use():
    """fit_grid runs on one BLAS / OpenMP thread, but threadpoolctl limits only the libraries already
    loaded when the limit is entered; in a fresh process sklearn's first import (inside the fits)
    loaded scipy's OpenBLAS and OpenMP after it, and the grid ran 10x slower. In a fresh interpreter,
    every thread-pool library loaded once a probe is fitted must already have been loaded when
    the limit was entered."""
    import subprocess
    import sys

    code = """
import json, numpy as np, torch, threadpoolctl
import refusal.probes as probes
def libs():
    return sorted({p["filepath"] for p in threadpoolctl.threadpool_info()})
at_limit, at_fit = [], []
limits = threadpoolctl.threadpool_limits
def limits_spy(*a, **k):
    at_limit.extend(libs())
    return limits(*a, **k)
threadpoolctl.threadpool_limits = limits_spy
fit = probes.fit_probe
def fit_spy(x, y, cfg):
    probe = fit(x, y, cfg)
    at_fit.extend(libs())
    return probe
probes.fit_probe = fit_spy
x = torch.randn(8, 1, 1, 4)
probes.fit_grid(x, np.r_[np.ones(4, int), np.zeros(4, int)], probes.ProbeConfig(cs=(1.0,), folds=2))
print(json.dumps(dict(at_limit=at_limit, at_fit=at_fit)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["at_limit"] and set(seen["at_fit"]) <= set(seen["at_limit"]), seen
