"""Model judges, loaded once per process and run batched: HarmBench's classifier, Llama Guard and
WildGuard (causal LMs, through lm.generation: vLLM where it is installed and faster, the toolkit's
own continuous batching otherwise) and refusal classifiers (sequence classifiers, batched forward
passes). Safetensors only, trust_remote_code off.

A judge's identity is its kind, the digest of its weight files and the version of the prompt
format it is read with (refusal.judge_formats); judgements are cached under it (refusal.judging).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from lm.errors import UserError

from .judge_formats import (
    Reading,
    classifier_text,
    format_version,
    harmbench_prompt,
    llama_guard_prompt,
    read_classifier,
    read_harmbench,
    read_llama_guard,
    read_wildguard,
    refusal_label,
    rules,
    wildguard_prompt,
)
from .judge_spec import CAUSAL, KEYWORD, MODEL_KINDS, JudgeSpec, local_dir

CLASSIFIER_BATCH = 16


@dataclass
class LoadedJudge:
    spec: JudgeSpec
    model: torch.nn.Module
    tokenizer: object
    refusal_index: int | None = None  # sequence classifiers: the refusal label's index

    def read(self, items: list[tuple[str, str]], desc: str = "") -> list[Reading]:
        """One reading per (prompt, reply)."""
        if not items:
            return []
        if MODEL_KINDS[self.spec.kind][1] == CAUSAL:
            return self._generate(items, desc)
        return self._classify(items)

    def prompt_text(self, prompt: str, reply: str) -> str:
        """The exact text the judge is prompted with for one reply."""
        kind, tok = self.spec.kind, self.tokenizer
        if kind == "harmbench":
            return bos_prefix(tok) + harmbench_prompt(
                prompt, clip(tok, reply, rules(kind)["truncate_generation_tokens"])
            )
        if kind == "wildguard":
            return bos_prefix(tok) + wildguard_prompt(prompt, reply)
        if getattr(tok, "chat_template", None):  # a released Llama Guard checkpoint: its own template
            return chat_template_text(tok, prompt, reply)
        return llama_guard_prompt(prompt, reply)

    def _generate(self, items, desc: str) -> list[Reading]:
        from lm.generation import SamplingConfig, generate

        kind = self.spec.kind
        texts = [self.prompt_text(p, r) for p, r in items]
        outs = generate(
            self.model,
            self.tokenizer,
            texts,
            SamplingConfig(max_new_tokens=rules(kind)["max_new_tokens"]),
            desc=desc or f"judge {self.spec.name}",
        )
        read = {"harmbench": read_harmbench, "llama-guard": read_llama_guard, "wildguard": read_wildguard}[kind]
        return [read(o[0]) for o in outs]

    @torch.no_grad()
    def _classify(self, items) -> list[Reading]:
        kind, tok, model = self.spec.kind, self.tokenizer, self.model
        limit = min(rules(kind)["max_length"], getattr(tok, "model_max_length", None) or rules(kind)["max_length"])
        labels = {int(i): str(n) for i, n in model.config.id2label.items()}
        device = next(model.parameters()).device
        out: list[Reading] = []
        for start in range(0, len(items), CLASSIFIER_BATCH):
            batch = items[start : start + CLASSIFIER_BATCH]
            texts = [classifier_text(kind, p, r) for p, r in batch]
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit).to(device)
            enc.pop("token_type_ids", None)  # llm-guard passes return_token_type_ids=False
            probs = torch.softmax(model(**enc).logits.float(), dim=-1).cpu().tolist()
            for (_, reply), p in zip(batch, probs):
                if kind == "refusal-classifier" and not reply.strip():
                    out.append(Reading(refused=False, raw="empty reply"))  # llm-guard: an empty output is no refusal
                else:
                    out.append(read_classifier(kind, p, self.refusal_index, labels))
        return out


def bos_prefix(tokenizer) -> str:
    """The BOS token's text where the tokenizer adds one by default: the authors tokenize the
    judge's prompt with special tokens, the toolkit's generation without."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""


def clip(tokenizer, text: str, tokens: int) -> str:
    """The first `tokens` tokens of a reply, decoded again (HarmBench clips generations so, with
    the classifier's tokenizer, special tokens counted and dropped)."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "right"
    try:
        ids = tokenizer.encode(text, max_length=tokens, truncation=True)
    finally:
        tokenizer.truncation_side = side
    return tokenizer.decode(ids, skip_special_tokens=True)


def chat_template_text(tokenizer, prompt: str, reply: str) -> str:
    """The user turn and the reply through the judge's own chat template (plain-string contents, or
    the list-of-parts contents some Llama Guard 3 templates read)."""
    for content in (lambda t: t, lambda t: [{"type": "text", "text": t}]):
        chat = [{"role": "user", "content": content(prompt)}, {"role": "assistant", "content": content(reply)}]
        try:
            return tokenizer.apply_chat_template(chat, tokenize=False)
        except Exception:  # noqa: BLE001 - jinja raises many types; the list form is tried next
            continue
    raise UserError("the judge's chat template accepts neither plain nor list-of-parts message contents")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=None)
def load_judge(spec: JudgeSpec) -> LoadedJudge:
    """The judge's model and tokenizer, loaded once per process; a judge that does not load is one
    UserError naming it."""
    if spec.kind == KEYWORD:
        raise ValueError("keyword judges need no model")
    where = f"judge {spec.text!r}"
    device = _device()
    if MODEL_KINDS[spec.kind][1] == CAUSAL:
        from lm.loading import load_model

        # From its directory where it has one (a hub id in the local cache too), so that vLLM can serve it.
        where_from = local_dir(spec.target)
        try:
            loaded = load_model(
                str(where_from or spec.target), dtype="bfloat16" if device == "cuda" else "float32", device=device
            )
        except UserError as e:
            raise UserError(f"{where} does not load: {e}") from None
        return LoadedJudge(spec, loaded.model, loaded.tokenizer)
    return _load_classifier(spec, where, device)


def _load_classifier(spec: JudgeSpec, where: str, device: str) -> LoadedJudge:
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = local_dir(spec.target) or spec.target
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{where} does not load: {str(e).splitlines()[0]}") from None
    index = refusal_label(model.config.id2label)
    if index is None:
        raise UserError(
            f"{where}: the classifier's labels ({', '.join(map(str, model.config.id2label.values()))}) have no refusal label"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedJudge(spec, model.to(device).eval(), tokenizer, index)


@lru_cache(maxsize=None)
def judge_identity(spec: JudgeSpec) -> dict:
    """(kind, weights fingerprint, prompt-format version): what a cached judgement is keyed by.
    The weights are hashed from their files, so a judgement cached earlier is found without loading
    the model (a hub id not yet on disk is loaded first)."""
    path = local_dir(spec.target)
    if path is None:
        load_judge(spec)
        path = local_dir(spec.target)
    if path is None:
        raise UserError(f"judge {spec.text!r}: its weights are not on disk after loading; give its local directory")
    from lm.cache import files_digest

    files = files_digest(path, [p.name for p in Path(path).glob("*.safetensors")])
    weights = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return dict(kind=spec.kind, weights=weights, format=_format(spec, path))


def _format(spec: JudgeSpec, path: Path) -> str:
    if spec.kind == "llama-guard":
        template = _chat_template(path)
        if template:
            return f"chat-template#{hashlib.sha256(template.encode()).hexdigest()[:16]}"
    return format_version(spec.kind)


def _chat_template(path: Path) -> str | None:
    """The tokenizer's chat template as stored (tokenizer_config.json or chat_template.jinja)."""
    jinja = Path(path) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = Path(path) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else json.dumps(template) if template else None
    return None
