"""Compress a model with llm-compressor, in llm-compressor's own environment (it pins an older
transformers than the toolkit's, so benchmarks.maintained runs this file with that environment's
Python; it imports nothing from the toolkit).

    python benchmarks/llmcompressor_run.py MODEL_DIR CALIBRATION.json METHOD OUT_DIR

CALIBRATION.json: a list of token-id lists (the toolkit's calibration rows, padding dropped), so
both implementations fit the same tokens. METHOD: gptq-w4a16 (symmetric int4, group 128, no
activation ordering: the toolkit's GPTQ defaults), wanda-0.5, sparsegpt-0.5, sparsegpt-2:4 (block
128, dampening 0.01, as the toolkit), w4a16-rtn (round-to-nearest int4 group 128, data-free: on a
2:4-pruned MODEL_DIR, llm-compressor's sparse W4A16; CALIBRATION is then not read). OUT_DIR is written by `save_pretrained(save_compressed=True)`:
a compressed-tensors checkpoint for the quantized model; pruned models, which compressed-tensors no
longer stores sparse, come out as float weights with their zeros.
"""

import json
import sys
import time


def recipe(method: str):
    if method == "gptq-w4a16":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(
            targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder=None
        )
    if method == "w4a16-rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["re:.*lm_head"])
    if method == "wanda-0.5":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        # Pruning modifiers' `targets` name the decoder layers whose linears they prune (the default
        # finds them); targets="Linear" matches no layer *containing* a linear and prunes nothing.
        # Their ignore list needs the regex: a plain "lm_head" leaves the LM head (and so a tied
        # embedding) pruned.
        return WandaPruningModifier(sparsity=0.5, mask_structure="0:0", ignore=["re:.*lm_head"])
    if method in ("sparsegpt-0.5", "sparsegpt-2:4"):
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        structure = "2:4" if method.endswith("2:4") else "0:0"
        return SparseGPTModifier(
            sparsity=0.5, mask_structure=structure, ignore=["re:.*lm_head"], block_size=128, dampening_frac=0.01
        )
    raise SystemExit(f"error: unknown method {method!r}")


def main(model_dir: str, calibration: str, method: str, out_dir: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    if method == "w4a16-rtn":
        rows = []
        oneshot(model=model, recipe=recipe(method))
    else:
        rows = json.loads(open(calibration, encoding="utf-8").read())
        data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
        oneshot(
            model=model,
            dataset=data,
            recipe=recipe(method),
            max_seq_length=max(len(r) for r in rows),
            num_calibration_samples=len(rows),
            shuffle_calibration_samples=False,
        )
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    import llmcompressor

    with open(f"{out_dir}/llmcompressor_run.json", "w", encoding="utf-8") as f:
        json.dump(dict(method=method, seconds=seconds, llmcompressor=llmcompressor.__version__, rows=len(rows)), f)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
