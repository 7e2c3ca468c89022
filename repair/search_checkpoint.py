"""The anchored search's state after each step, kept so that an interrupted search resumes there.

On a large model each step of the search is a gradient pass and a validation read, and a search
is a few dozen steps: a run killed after hours would otherwise begin again from nothing. After
every step the restoration order is written (safetensors, with the search's key and the order's
digest in its metadata), then the points so far (JSON naming that digest), each atomically, so a
pair written by two different steps is never read as one state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lm.cache import read_cached_json, read_cached_tensors, tensors_digest, write_cached_json, write_cached_tensors

from .restoration_order import RestorationOrder


@dataclass
class SearchState:
    points: list[dict]  # every point visited so far, as AnchoredSearch.run records them
    step: int  # the last step completed
    order: RestorationOrder
    seconds: float  # the search's time so far, over every invocation


class SearchCheckpoint:
    """Where one search (identified by `key`: everything its result depends on) keeps its state."""

    def __init__(self, where: Path, key: dict):
        self.json, self.tensors, self.key = (
            Path(where) / "anchored_progress.json",
            Path(where) / "anchored_progress.safetensors",
            key,
        )

    def save(self, state: SearchState) -> None:
        tensors = state.order.to_tensors()
        write_cached_tensors(self.tensors, self.key, tensors)
        result = dict(
            points=state.points,
            step=state.step,
            next_seq=state.order.next_seq,
            seconds=state.seconds,
            order_sha256=tensors_digest(tensors),
        )
        write_cached_json(self.json, self.key, result)

    def load(self) -> SearchState | None:
        """The state last saved for this key; None when there is none, or it does not verify."""
        result, tensors = read_cached_json(self.json, self.key), read_cached_tensors(self.tensors, self.key)
        if result is None or tensors is None or result.get("order_sha256") != tensors_digest(tensors):
            return None
        order = RestorationOrder.from_tensors(tensors)
        order.next_seq = result["next_seq"]  # a rolled-back tail leaves numbers unused above the last kept one
        return SearchState(result["points"], result["step"], order, result["seconds"])

    def clear(self) -> None:
        self.json.unlink(missing_ok=True)
        self.tensors.unlink(missing_ok=True)
