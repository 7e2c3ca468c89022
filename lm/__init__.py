"""Shared model-access layer: loading, chat formatting, residual-stream hooks, generation, data.

Everything else in the toolkit (refusal/, compression/, repair/, experiments/) talks to models
only through this package, so supporting a new architecture means touching only this layer.
"""
