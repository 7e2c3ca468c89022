"""python -m compression.export --variant DIR --out DIR: a toolkit GPTQ or RTN variant (a float
checkpoint whose decoder linears lie on a symmetric b-bit grid) written packed in the GPTQ format,
so that GPTQModel, AutoGPTQ-style loaders and vLLM serve it with integer kernels.

The integer codes and scales are read back from the float weights (compression.rtn.grid_codes:
exact, since every weight is code * scale); GPTQModel's own packer writes qweight / qzeros /
scales / g_idx. The result is reloaded through GPTQModel and checked against the variant before
the directory appears (scales are float16 in the format: a relative error of about 2^-11).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lm.architecture import decoder_linears
from lm.cache import atomic_dir
from lm.cli import parse_config
from lm.errors import UserError, cli
from lm.loading import load_model

from .checkpoint import read_manifest
from .rtn import grid_codes

QUANTIZERS = ("gptq", "rtn")
FLOAT16_RTOL = 2.0**-9  # a float16 scale's rounding (2^-11), with margin for the float16 product


@dataclass
class ExportConfig:
    variant: str = (
        ""  #: the variant's checkpoint directory (with its compression.json), e.g. runs/x/variants/gptq-int4/model
    )
    out: str = ""  #: where the packed checkpoint goes (must not exist)
    format: str = "gptq"  #: the packed format (only gptq)


def export_gptq(variant_dir: Path, out: Path) -> dict:
    """Pack the variant in `variant_dir` into `out` (atomically); returns what was written."""
    manifest = read_manifest(variant_dir)
    if manifest is None or manifest.get("method") not in QUANTIZERS:
        raise UserError(
            f"{variant_dir}: not a toolkit {' / '.join(QUANTIZERS)} variant (its compression.json names the method)"
        )
    if out.exists():
        raise UserError(f"--out {out} exists; choose a new directory")
    bits, group = manifest["params"]["bits"], manifest["params"]["group_size"]
    from lm.packed import PackedFormat, require
    from lm.packed.gptq import save_gptq

    require(PackedFormat("gptq", bits, group, {}))
    loaded = load_model(str(variant_dir))
    linears = {name.removesuffix(".weight"): lin for name, lin in decoder_linears(loaded.model).items()}
    grids = {name: grid_codes(lin.weight, bits, group) for name, lin in linears.items()}
    with atomic_dir(out) as tmp:
        save_gptq(loaded.model, loaded.tokenizer, tmp, bits, group, grids)
        check = load_model(str(tmp))
        reread = dict(check.model.named_modules())
        for name, lin in linears.items():
            if name not in check.packed.quantized:
                raise UserError(f"{name} did not come back packed from GPTQModel")
            error = float(
                (reread[name].weight.float() - lin.weight.float()).abs().max()
                / lin.weight.float().abs().max().clamp_min(1e-12)
            )
            if error > FLOAT16_RTOL:
                raise UserError(
                    f"{name} reads back from GPTQModel {error:.2g} off (relative to its largest weight); export aborted"
                )
    return dict(out=str(out), modules=len(grids), bits=bits, group_size=group)


@cli
def main(argv=None) -> int:
    cfg, _ = parse_config(
        ExportConfig, argv, prog="python -m compression.export", description=__doc__.strip().split("\n\n")[0]
    )
    if not cfg.variant or not cfg.out:
        raise UserError("--variant and --out are required")
    if cfg.format != "gptq":
        raise UserError(f"unknown export format {cfg.format!r}; supported: gptq")
    written = export_gptq(Path(cfg.variant), Path(cfg.out))
    print(
        f"wrote {written['out']}: {written['modules']} linears packed as GPTQ int{written['bits']} "
        f"g{written['group_size'] or 'row'}; GPTQModel reads them back within float16 scale rounding"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
