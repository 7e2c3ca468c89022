"""The continuous-batching engine (lm.continuous_batching) against transformers' generate and
against each row decoded alone."""

from __future__ import annotations

from lm.chat import format_prompts
from lm.generation import SamplingConfig, generate
from tests.lm.helpers import INSTRUCTIONS


def test_continuous_batching_matches_transformers_generate(tiny_pair):
    """The engine drops finished rows from the KV cache; greedy text must equal `generate`'s."""
    model, tokenizer = tiny_pair
    prompts = format_prompts(tokenizer, INSTRUCTIONS)
    cfg = dict(max_new_tokens=12, batch_size=4)
    ours = generate(model, tokenizer, prompts, SamplingConfig(backend="hf", **cfg))
    reference = generate(model, tokenizer, prompts, SamplingConfig(backend="hf-generate", **cfg))
    assert ours == reference


def _ids(tokenizer, instructions):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in format_prompts(tokenizer, instructions)]


def _until_stop(tokens, stops):
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in stops), tokens)


def test_continuous_batching_drops_finished_rows(tiny_qwen2):
    from lm.continuous_batching import decode_continuous
    from lm.generation import stop_token_ids

    model, tokenizer = tiny_qwen2
    sequences = _ids(tokenizer, INSTRUCTIONS[:4])
    first = decode_continuous(model, sequences, 1, [], batch_size=4)
    # Declare row 0's first token a stop token: row 0 ends after one token, others go on.
    stops = [first[0][0]]
    out = decode_continuous(model, sequences, 8, stops, batch_size=4)
    full = decode_continuous(model, sequences, 8, [], batch_size=4)
    assert out[0] == [first[0][0]]
    # Until a row meets a stop token, its tokens equal the unstopped run's.
    assert out == [_until_stop(f, stops) for f in full]
    assert stop_token_ids(model, tokenizer)


def test_continuous_batching_admits_prompts_into_freed_rows(tiny_pair, monkeypatch):
    """Waiting prompts join a running batch as rows finish; every row's tokens equal its
    decoding alone."""
    from lm import continuous_batching as cb

    model, tokenizer = tiny_pair
    sequences = _ids(tokenizer, INSTRUCTIONS + [i + " please" for i in INSTRUCTIONS])
    alone = [cb.decode_continuous(model, [s], 10, [], batch_size=1)[0] for s in sequences]
    # Tokens some prompts produce early become stop tokens, so rows finish at different steps.
    stops = sorted({alone[0][1], alone[3][4]})
    expected = [_until_stop(a, stops) for a in alone]
    assert len({len(e) for e in expected}) > 1, "the test needs rows that finish at different steps"
    joins = []
    concat = cb.concat_caches
    monkeypatch.setattr(cb, "concat_caches", lambda *a: joins.append(1) or concat(*a))
    assert cb.decode_continuous(model, sequences, 10, stops, batch_size=3) == expected
    assert joins, "no prompt was admitted into a running batch"
