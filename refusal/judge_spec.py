"""What `--judges` names: the keyword judges by name (wei2024, arditi2024) and model judges as
`kind:hub-id-or-dir` (harmbench, llama-guard, wildguard, refusal-classifier, minos), checked
before any model loads.

A local directory must hold a model of the declared kind (config.json naming a causal LM for the
generative judges, a sequence classifier with a refusal label for the classifiers), safetensors
weights and a tokenizer. A hub id found in the local Hugging Face cache is checked the same way;
one that is not is checked when it loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lm.errors import UserError

from .judge_formats import HARMFUL, REFUSAL, REFUSAL_LABELS, UNSAFE, refusal_label
from .judges import JUDGE_NAMES

CAUSAL, CLASSIFIER = "causal LM", "sequence classifier"

#: kind -> (verdict kinds it gives, the model family it must be)
MODEL_KINDS = {
    "harmbench": ((HARMFUL,), CAUSAL),
    "llama-guard": ((UNSAFE,), CAUSAL),
    "wildguard": ((UNSAFE, REFUSAL), CAUSAL),
    "refusal-classifier": ((REFUSAL,), CLASSIFIER),
    "minos": ((REFUSAL,), CLASSIFIER),
}
KEYWORD = "keyword"
USAGE = (
    f"keyword judges: {', '.join(JUDGE_NAMES)}; model judges: KIND:HUB-ID-OR-DIR with KIND one of {', '.join(MODEL_KINDS)} "
    "(e.g. harmbench:cais/HarmBench-Mistral-7b-val-cls)"
)


@dataclass(frozen=True)
class JudgeSpec:
    text: str  # as given, e.g. 'harmbench:cais/HarmBench-Mistral-7b-val-cls'; the judge's name in reports
    kind: str  # 'keyword' or one of MODEL_KINDS
    target: str  # the keyword judge's name, or the hub id / directory

    @property
    def name(self) -> str:
        return self.text

    @property
    def verdicts(self) -> tuple[str, ...]:
        """The verdict kinds the judge gives (a keyword judge: attack success and refusal)."""
        return ("attack success", REFUSAL) if self.kind == KEYWORD else MODEL_KINDS[self.kind][0]

    @property
    def judges_harm(self) -> bool:
        """It gives the verdict an ASR is counted with (jailbroken, harmful compliance, unsafe)."""
        return self.kind == KEYWORD or any(v in (HARMFUL, UNSAFE) for v in self.verdicts)

    @property
    def judges_refusal(self) -> bool:
        return REFUSAL in self.verdicts


@dataclass(frozen=True)
class JudgePanel:
    """The judges a run reports: the keyword judges always, and the model judges given."""

    specs: tuple[JudgeSpec, ...]

    @property
    def model_judges(self) -> tuple[JudgeSpec, ...]:
        return tuple(s for s in self.specs if s.kind != KEYWORD)

    def harm_judges(self) -> list[str]:
        return [s.name for s in self.specs if s.judges_harm]

    def refusal_judges(self) -> list[str]:
        return [s.name for s in self.specs if s.judges_refusal]


def parse_judge(text: str) -> JudgeSpec:
    """One --judges entry, its syntax only (no file is read)."""
    text = str(text).strip()
    if text in JUDGE_NAMES:
        return JudgeSpec(text, KEYWORD, text)
    kind, sep, target = text.partition(":")
    if not sep or kind not in MODEL_KINDS:
        raise UserError(f"unknown judge {text!r}; {USAGE}")
    if not target.strip():
        raise UserError(f"judge {text!r} names no model: give {kind}:HUB-ID-OR-DIR")
    return JudgeSpec(text, kind, target.strip())


def parse_judges(texts) -> tuple[JudgeSpec, ...]:
    specs = tuple(parse_judge(t) for t in texts)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"a judge is listed twice in --judges: {', '.join(n for n in names if names.count(n) > 1)}")
    return specs


def judge_panel(texts) -> JudgePanel | None:
    """The panel of a --judges list (None for an empty one: the keyword judges alone, as before).
    Every model judge's directory is checked here; both keyword judges stay in the panel when the
    list names none of them."""
    specs = parse_judges(texts)
    if not specs:
        return None
    for spec in specs:
        check_judge(spec)
    if not any(s.kind == KEYWORD for s in specs):
        specs = tuple(JudgeSpec(n, KEYWORD, n) for n in JUDGE_NAMES) + specs
    return JudgePanel(specs)


def local_dir(target: str) -> Path | None:
    """The directory a judge's weights are read from: the target itself, or a hub id's snapshot in
    the local Hugging Face cache; None for a hub id that is not there."""
    path = Path(target).expanduser()
    if path.exists():
        return path
    from lm.loading import path_like

    if path_like(target) or target.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(target, "config.json")
    except Exception:  # noqa: BLE001 - an id the hub library rejects is checked when it loads
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_judge(spec: JudgeSpec) -> None:
    """The checks that need no model: the directory holds a model of the declared kind."""
    if spec.kind == KEYWORD:
        return
    where = f"judge {spec.text!r}"
    path = local_dir(spec.target)
    if path is None:
        from lm.loading import path_like

        if path_like(spec.target) or Path(spec.target).expanduser().is_absolute():
            raise UserError(f"{where}: directory not found: {spec.target}")
        return
    if not path.is_dir():
        raise UserError(f"{where}: {spec.target} is not a model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{where}: no config.json in {spec.target}: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise UserError(
            f"{where}: no *.safetensors weights in {spec.target}; only safetensors checkpoints are loaded (never pickles)"
        )
    from lm.loading import TOKENIZER_FILES

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{where}: no tokenizer in {spec.target} (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read {config_file}: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: {config_file} is not a mapping of settings")
    family = MODEL_KINDS[spec.kind][1]
    archs = [str(a) for a in config.get("architectures") or []]
    held = f"{', '.join(archs) or 'no architecture'} ({config.get('model_type', 'no model_type')})"
    suffix = "ForCausalLM" if family == CAUSAL else "ForSequenceClassification"
    if not any(a.endswith(suffix) for a in archs):
        raise UserError(f"{where}: {spec.target} holds {held}, not a {family}; {spec.kind} judges are {family}s")
    if family == CLASSIFIER:
        labels = config.get("id2label") or {}
        if not isinstance(labels, dict) or refusal_label(labels) is None:
            names = ", ".join(str(v) for v in (labels.values() if isinstance(labels, dict) else [])) or "none"
            raise UserError(
                f"{where}: the classifier's labels ({names}) have no refusal label (exactly one of "
                f"{', '.join(REFUSAL_LABELS)}, any case)"
            )
