"""Interoperability: Mamba-2 checkpoints of mamba_ssm and Hugging Face in and out of the zoo
(zoo.interop.mamba2, no extra dependency), and any zoo model as a Hugging Face transformers model
(zoo.interop.hf, needs the `hf` extra: pip install 'sessa-zoo[hf]'). docs/interop.md has the details.
"""

from zoo.interop.mamba2 import (Mamba2LM, UnsupportedOptionError, load_hf_mamba2, load_mamba2, load_mamba_ssm,
                                save_hf_mamba2, save_mamba_ssm)

__all__ = ["Mamba2LM", "UnsupportedOptionError", "load_hf_mamba2", "load_mamba2", "load_mamba_ssm", "save_hf_mamba2",
           "save_mamba_ssm"]
