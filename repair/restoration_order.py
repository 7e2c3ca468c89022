"""The order in which a repair restored weights, so that any state it passed through can be rebuilt.

Each restored entry carries the sequence number of the unit that restored it; a state of the search
is "every entry numbered up to `through`". Entries put back to their compressed values (a rollback)
are dropped from the order, so the numbers of the states before them still rebuild those states.
Stored as two tensors per matrix (flat indices and their numbers) in a safetensors file.
"""

from __future__ import annotations

import torch


class RestorationOrder:
    """Every restored entry with the sequence number of the unit that restored it: the state at any
    point of the search is the entries numbered up to that point's `through`."""

    def __init__(self):
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.next_seq = 0

    def add(self, name: str, flat: torch.Tensor, seq: torch.Tensor) -> None:
        if len(flat):
            self.parts.setdefault(name, []).append((flat.long(), seq.long()))

    def keep(self, name: str, predicate) -> None:
        """Keep the entries of `name` whose sequence numbers satisfy `predicate` (a rollback)."""
        self.parts[name] = [(f[k], s[k]) for f, s in self.parts.get(name, []) for k in [predicate(s)]]

    def masks(self, shapes: dict[str, tuple[int, ...]], through: int | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, parts in self.parts.items():
            m = torch.zeros(int(torch.Size(shapes[name]).numel()), dtype=torch.bool)
            for f, s in parts:
                m[f if through is None else f[s <= through]] = True
            if bool(m.any()):
                out[name] = m.view(shapes[name])
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, parts in self.parts.items():
            if parts and sum(len(f) for f, _ in parts):
                out[f"{name}.index"] = torch.cat([f for f, _ in parts])
                out[f"{name}.seq"] = torch.cat([s for _, s in parts])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RestorationOrder":
        order = cls()
        for key in tensors:
            if key.endswith(".index"):
                name = key.removesuffix(".index")
                order.add(name, tensors[key], tensors[f"{name}.seq"])
        order.next_seq = 1 + max((int(s.max()) for parts in order.parts.values() for _, s in parts), default=-1)
        return order
