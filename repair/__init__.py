"""Repairing a compressed model's refusal: AIRD (restore one block) and targeted weight restoration."""
