"""Refusal behaviour and the refusal direction: judges, ASR, difference-of-means directions."""
