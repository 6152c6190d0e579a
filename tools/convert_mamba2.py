"""Convert a Mamba-2 language-model checkpoint between mamba_ssm, Hugging Face and the zoo.

    python tools/convert_mamba2.py ckpt/ --to hf out_hf/           # -> Mamba2ForCausalLM folder
    python tools/convert_mamba2.py ckpt/ --to mamba_ssm out_ssm/   # -> MambaLMHeadModel folder
    python tools/convert_mamba2.py ckpt/ --to zoo out_zoo/         # -> transformers folder of the zoo model
                                                                   #    (model type sessa_zoo; needs the hf extra)
    python tools/convert_mamba2.py ckpt/ --gin                     # print the zoo model's gin config

ckpt/ is a mamba_ssm folder (config.json + pytorch_model.bin) or a Hugging Face Mamba2ForCausalLM
folder (config.json + safetensors); the format is read from config.json. Options that the target
cannot represent are refused with an error naming them (docs/interop.md has the tables).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zoo import cli
from zoo.interop import Mamba2LM, load_mamba2, save_hf_mamba2, save_mamba_ssm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("checkpoint", type=Path, help="mamba_ssm or Hugging Face Mamba-2 folder")
    parser.add_argument("out", type=Path, nargs="?", help="folder to write (with --to)")
    parser.add_argument("--to", choices=["hf", "mamba_ssm", "zoo"], help="format to write")
    parser.add_argument("--gin", action="store_true", help="print the gin config of the converted zoo model")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="convert the weights (default: as stored)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in `out`")
    args = parser.parse_args(argv)
    if (args.to is None) != (args.out is None):
        parser.error("--to and the output folder go together")
    if args.to is None and not args.gin:
        parser.error("nothing to do: give --to FORMAT OUT, --gin, or both")

    model = load_mamba2(args.checkpoint, dtype=DTYPES[args.dtype] if args.dtype else None)
    spec = Mamba2LM.from_model(model)
    if args.gin:
        print(spec.gin_config(), end="")
    if args.to == "hf":
        save_hf_mamba2(model, args.out, overwrite=args.overwrite)
    elif args.to == "mamba_ssm":
        save_mamba_ssm(model, args.out, overwrite=args.overwrite)
    elif args.to == "zoo":
        from zoo.interop.hf import ZooForCausalLM

        if (args.out / "config.json").exists() and not args.overwrite:
            parser.error(f"{args.out} already holds a config.json; pass --overwrite to replace that checkpoint")
        ZooForCausalLM.from_zoo(model, spec.gin_config()).save_pretrained(args.out)
    if args.to:
        print(f"wrote {args.out} ({args.to})")


if __name__ == "__main__":
    cli.run(main)
