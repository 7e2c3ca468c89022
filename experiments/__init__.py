"""Entry points: `python -m experiments.compare_refusal` (the main job) and the reproductions."""
