"""Does harmless fine-tuning move the safety-critical weights (`python -m experiments.frozen_finetune`):
the experiment and its command line in finetune.py, LoRA training in lora.py, the report in report.py."""

from .finetune import FrozenFinetune, FrozenFinetuneConfig, main, parse_args

__all__ = ["FrozenFinetune", "FrozenFinetuneConfig", "main", "parse_args"]
