"""Model judges' verdicts on a measurement's stored completions, cached beside it.

A judgement is cached in `<store>/judgements/` under the generation measurement's key digest and
the judge's identity (kind, weights fingerprint, prompt-format version; refusal.model_judges), so
a judge added to a finished run reads the completions already generated and generates nothing
with the evaluated model, and a judge run once is not run again. The generation entry itself is
untouched: without --judges every cache key and every report stays what it was.

The verdicts are merged into the measurement's records under the judge's name, beside the keyword
judges': `jailbroken[name]` for a harmful-compliance or unsafe-response verdict (ASR), `refused[name]`
for a refusal verdict (over-refusal). An answer the judge gave that cannot be parsed counts as the
negative verdict (HarmBench's own ASR counts its label -1 so) and is counted in `unparsed`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from lm.cache import cached_json, timed, warn

from .judge_formats import formats, needs_tokens
from .judge_spec import JudgePanel, JudgeSpec


def judge_measurement(
    result: dict, panel: JudgePanel, store: Path, generation: dict, max_new_tokens: int, harmless: bool = False
) -> dict:
    """`result` (a refusal.measure generation result) with each model judge's verdicts merged into
    a copy of its records, and `judged_by`: each judge's identity and unparsed count. On harmless
    prompts only the judges that give a refusal verdict run (the others have nothing to say about
    over-refusal)."""
    from .model_judges import judge_identity

    records = copy.deepcopy(result["records"])
    judged_by = {}
    for spec in panel.model_judges:
        if harmless and not spec.judges_refusal:
            continue
        identity = judge_identity(spec)
        length_warning(spec, max_new_tokens)
        params = dict(generation=generation, judge=identity)
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]
        judgement = cached_json(
            Path(store) / "judgements" / f"{digest}.json",
            params,
            lambda spec=spec: timed(lambda: judge_records(spec, records)),
            named_by_params=True,
        )
        merge(records, spec, judgement)
        judged_by[spec.name] = dict(identity, unparsed=judgement["unparsed"], n=judgement["n"])
    return dict(result, records=records, judged_by=judged_by)


def judge_records(spec: JudgeSpec, records: list[dict]) -> dict:
    """Every completion of every record read by the judge, in record order."""
    from .model_judges import load_judge

    items = [(r["prompt"], c) for r in records for c in r["completions"]]
    readings = iter(load_judge(spec).read(items, desc=f"judge {spec.kind}"))
    per_record = []
    for r in records:
        rs = [next(readings) for _ in r["completions"]]
        per_record.append(
            dict(
                id=r["id"],
                harmful=[x.harmful for x in rs],
                refused=[x.refused for x in rs],
                parsed=[x.parsed for x in rs],
                raw=[x.raw[:200] for x in rs],
            )
        )
    unparsed = sum(not p for r in per_record for p in r["parsed"])
    return dict(per_record=per_record, unparsed=unparsed, n=len(items))


def merge(records: list[dict], spec: JudgeSpec, judgement: dict) -> None:
    """The judgement's verdicts into the records (in place), matched by prompt id."""
    by_id = {v["id"]: v for v in judgement["per_record"]}
    if set(by_id) != {r["id"] for r in records}:
        raise ValueError(f"the cached judgement of {spec.name} is of other prompts than the measurement")
    for r in records:
        v = by_id[r["id"]]
        if spec.judges_harm:
            r["jailbroken"][spec.name] = [bool(x) for x in v["harmful"]]
        if spec.judges_refusal:
            r["refused"][spec.name] = [bool(x) for x in v["refused"]]


def length_warning(spec: JudgeSpec, max_new_tokens: int) -> str | None:
    """The sentence saying the completions are shorter than the judge needs (None if they are
    not); printed once per judge and length."""
    needed = needs_tokens(spec.kind)
    if needed is None or max_new_tokens >= needed:
        return None
    text = (
        f"judge {spec.name} needs completions of {needed} new tokens ({formats()[spec.kind]['needs_tokens_why']}); "
        f"these have at most {max_new_tokens}: raise --max-new-tokens to {needed} to judge them as its authors do"
    )
    _warn_once(text)
    return text


@lru_cache(maxsize=None)
def _warn_once(text: str) -> None:
    warn(text)
