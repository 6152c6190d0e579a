"""Sessa Zoo model assembly (plain Python; the gin wiring lives in zoo.gin_config).

    from zoo import CausalLM, Stack, summarize
    model = CausalLM(vocab_size=256, dim=64, stack=lambda d: Stack(d, "SASA"))
    print(summarize(model))

    from zoo import gin_config                       # config files instead of code
    gin_config.parse(["default.gin"], ["DIM = 128"])
    model = gin_config.build_model()
"""

from zoo.models import CausalLM, SequenceClassifier
from zoo.registry import REGISTRY, register_block, register_mixer
from zoo.stack import Stack
from zoo.summary import summarize

__all__ = ["REGISTRY", "CausalLM", "SequenceClassifier", "Stack", "register_block", "register_mixer", "summarize"]
