"""Compressed variants of a chat model: pruning and quantization, saved as loadable checkpoints."""
