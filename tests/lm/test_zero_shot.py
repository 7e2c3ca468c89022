"""Zero-shot utility scoring (lm.zero_shot): offline lm-eval tasks on the vendored files, tiny models only."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from lm import zero_shot
from lm.errors import UserError
from lm.zero_shot import ALL_TASKS, ZeroShotConfig, hellaswag_docs, load_tasks, offline, task_dir, zero_shot_accuracy

pytest.importorskip("lm_eval")

# Full evaluation splits as vendored (lm/data/README.md).
SIZES = {
    "boolq": 3270,
    "rte": 277,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}

# Rows read by hand from the vendored files: (row, start of the prompt lm-eval builds, choice count, gold, gold choice).
KNOWN = {
    "boolq": [
        (0, "All biomass goes through at least some of these steps", 2, 0, "no"),
        (1, "Property tax or 'house tax' is a local tax on buildings", 2, 1, "yes"),
        (100, "The result of breathing increased partial pressures of oxygen", 2, 1, "yes"),
    ],
    "rte": [
        (0, "Dana Reeve, the widow of the actor Christopher Reeve", 2, 1, "False"),
        (1, "Yet, we now are discovering that antibiotics", 2, 0, "True"),
        (100, "Prince Charles, Britain's heir to the throne", 2, 0, "True"),
    ],
    "hellaswag": [
        (0, "Roof shingle removal: A man is sitting on a roof. he", 4, 3, "starts pulling up roofing on a roof."),
        (
            100,
            "Washing face: A bottle of deep cleansing gel is shown. a woman",
            4,
            0,
            "holds up the bottle, then is shown",
        ),
    ],
    "arc_easy": [
        (0, "Question: Which statement best explains why photosynthesis", 4, 0, "Sunlight is the source of energy"),
        (
            100,
            "Question: Which of the following is more likely to occur in a plant cell",
            4,
            1,
            "formation of cellulose",
        ),
    ],
    "arc_challenge": [
        (
            0,
            "Question: An astronomer observes that a planet rotates faster",
            4,
            2,
            "Planetary days will become shorter.",
        ),
        (100, "Question: ", 4, 2, "The technology is environmentally friendly."),
    ],
    "openbookqa": [
        (0, "A person wants to start saving money", 4, 1, "quit eating lunch out"),
        (1, "There is most likely going to be fog around:", 4, 0, "a marsh"),
        (100, "Grey clouds can bring", 4, 1, "falling water molecules"),
    ],
}


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    # A fresh cache per run: the task YAMLs and converted HellaSwag are generated from scratch.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_REPAIR_CACHE", str(tmp_path_factory.mktemp("zs-cache")))
        yield


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(ALL_TASKS)


def test_all_task_yamls_load_offline_with_full_splits(tasks):
    assert set(tasks) == set(ALL_TASKS)
    for name, task in tasks.items():
        assert len(task.eval_docs) == SIZES[name], name
        assert task.OUTPUT_TYPE == "multiple_choice"
    yaml_dir = task_dir()
    assert sorted(p.stem for p in yaml_dir.glob("*.yaml")) == sorted(ALL_TASKS)
    # lm-eval's json loader needs absolute data paths; none may point back at the temporary build dir.
    text = (yaml_dir / "boolq.yaml").read_text()
    assert str((zero_shot.ZERO_SHOT_DATA / "boolq" / "boolq.jsonl").resolve()) in text


def test_task_dir_is_reused(tasks):
    first = task_dir()
    stamp = (first / "rte.yaml").stat().st_mtime_ns
    assert task_dir() == first and (first / "rte.yaml").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_documents_have_lm_eval_prompts_and_gold(tasks, name):
    task = tasks[name]
    for row, prefix, n_choices, gold, gold_choice in KNOWN[name]:
        doc = task.eval_docs[row]
        text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        assert text.startswith(prefix), (name, row, text[:80])
        assert len(choices) == n_choices and target == gold, (name, row)
        assert choices[gold].startswith(gold_choice), (name, row, choices)


def test_prompt_shapes_match_lm_eval(tasks):
    boolq = tasks["boolq"].doc_to_text(tasks["boolq"].eval_docs[0])
    assert not boolq.startswith("Passage:")
    assert boolq.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    rte = tasks["rte"].doc_to_text(tasks["rte"].eval_docs[0])
    assert rte.endswith(".\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert tasks["arc_easy"].doc_to_text(tasks["arc_easy"].eval_docs[0]).endswith("food webs?\nAnswer:")
    # Plain multiple choice everywhere except WinoGrande's partial scoring.
    assert {n: bool(t.multiple_input) for n, t in tasks.items()} == {n: n == "winogrande" for n in ALL_TASKS}


def test_winogrande_uses_partial_scoring(tasks):
    task = tasks["winogrande"]
    for row, gold in ((0, 1), (1, 0), (100, 1)):
        doc = task.eval_docs[row]
        assert task.doc_to_text(doc) == gold  # an int: lm-eval scores the continuation after each context
    doc = task.eval_docs[0]
    assert task.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert task.doc_to_target(doc) == "always got the easier cases."
    requests = task.construct_requests(doc, task.fewshot_context(doc, 0), metadata=("winogrande", 0, 1))
    assert [r.args for r in requests] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]


def test_hellaswag_conversion():
    docs = hellaswag_docs()
    assert len(docs) == SIZES["hellaswag"]
    assert all(len(d["choices"]) == 4 and d["label"] in range(4) for d in docs)
    assert docs[0]["label"] == 3 and docs[0]["choices"][3] == "starts pulling up roofing on a roof."
    # The few WikiHow [..] spans the upstream text kept are removed as lm-eval does (an unclosed
    # "[" stays, there as here).
    texts = [t for d in docs for t in (d["query"], *d["choices"])]
    assert not any(re.search(r"\[.*?\]", t) for t in texts)
    assert any("Visit a site like to find loads of creative activities" in t for t in texts)


def _manual_accuracy(model, tokenizer, task, limit):
    """Independent loglikelihood scoring: argmax over sum log p(continuation | context)."""
    hits = 0
    for doc in list(task.eval_docs)[:limit]:
        text, choices, gold = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        if isinstance(text, int):  # partial scoring: contexts vary, the continuation is fixed
            pairs, gold = [(c, " " + gold) for c in choices], text
        else:
            pairs = [(text, " " + c) for c in choices]
        scores = []
        for context, continuation in pairs:
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == gold)
    return hits / limit


def test_tiny_model_accuracy_matches_independent_scoring(tiny_qwen2, tasks):
    model, tokenizer = tiny_qwen2
    padding_side = tokenizer.padding_side
    cfg = ZeroShotConfig(tasks=("winogrande", "arc_easy", "rte"), limit=4, batch_size=4)

    result = zero_shot_accuracy(model, tokenizer, cfg)

    assert set(result["per_task"]) == set(cfg.tasks) and result["limit"] == 4 and result["seconds"] > 0
    for name, entry in result["per_task"].items():
        assert entry["n"] == 4
        assert 0.0 <= entry["acc"] <= 1.0
        assert ("acc_norm" in entry) == (name == "arc_easy")
        assert entry["acc"] == pytest.approx(_manual_accuracy(model, tokenizer, tasks[name], 4)), name
        # Per-document correctness, in document order: the mean is the accuracy, and the documents
        # are what the bootstrap interval resamples.
        assert len(entry["per_document"]) == 4 and set(entry["per_document"]) <= {0.0, 1.0}
        assert sum(entry["per_document"]) / 4 == pytest.approx(entry["acc"])
    assert 0.0 <= result["per_task"]["arc_easy"]["acc_norm"] <= 1.0
    assert result["average"] == pytest.approx(sum(e["acc"] for e in result["per_task"].values()) / 3)
    assert tokenizer.padding_side == padding_side  # generation elsewhere relies on left padding
    from refusal.measure import zero_shot_rates

    rates = zero_shot_rates(result)
    assert rates["average"]["value"] == pytest.approx(result["average"]) and rates["average"]["n"] == 12
    assert rates["per_task"]["rte"]["k"] == round(4 * result["per_task"]["rte"]["acc"])


def test_offline_forces_and_restores_flags(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    before = hub.HF_HUB_OFFLINE
    with offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
        assert hub.HF_HUB_OFFLINE is True
    assert "HF_DATASETS_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tasks=("mmlu",)), "unknown zero-shot task"),
        (dict(tasks=()), "unknown zero-shot task"),
        (dict(tasks=("rte", "rte")), "listed twice"),
        (dict(limit=0), "limit"),
        (dict(batch_size=0), "batch size"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        ZeroShotConfig(**kwargs)


def test_missing_lm_eval_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(UserError, match="pip install 'lm-eval"):
        zero_shot_accuracy(None, None, ZeroShotConfig(tasks=("rte",), limit=1))


def test_cli_prints_table(tiny_model_dir, capsys):
    path = tiny_model_dir("llama")
    assert (
        zero_shot.main(["--model", str(path), "--tasks", "rte", "openbookqa", "--limit", "2", "--batch-size", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "| rte | 2 |" in out and "| openbookqa | 2 |" in out and "| average |" in out


@pytest.mark.parametrize(
    "argv", [["--tasks", "nope"], ["--limit", "-1"], ["--model", "/no/such/model", "--tasks", "rte"]]
)
def test_cli_errors_are_one_line_exit_2(argv, capsys):
    assert zero_shot.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
