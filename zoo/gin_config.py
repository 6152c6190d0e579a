"""gin wiring: the only module that imports gin. Library classes stay plain Python.

    from zoo import gin_config
    gin_config.parse(["default.gin"], ["DIM = 128", "layer1/Sessa.num_heads = 4"])
    model = gin_config.build_model()                  # what `build_model.model` names (@CausalLM, ...)
    print(gin_config.operative_config())

Configurables: every registered mixer and block under its class name (Sessa, Attention, Mamba2,
GatedBlock, ResidualBlock, and any mixer a user registers, also after this module was imported),
MLP, SwiGLU, Stack, CausalLM, SequenceClassifier and build_model. Classes are registered with
`gin.register`, which leaves them unchanged: calling them from Python ignores gin; gin bindings
apply to what a config builds (references `@Stack`, and the layers a Stack builds from a pattern).

Config files are searched in the working directory, then in the repo's configs/, so
`include 'base/lm.gin'` and `--gin_file=default.gin` work from anywhere.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import gin
from torch import nn

from blocks.mlp import MLP, SwiGLU
from zoo import stack as stack_module
from zoo.models import CausalLM, SequenceClassifier
from zoo.registry import REGISTRY, Factory
from zoo.stack import Stack

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def configurable(factory: Factory) -> Factory:
    """The gin-configurable version of a class or function (registering it on first use).
    A functools.partial keeps its bound arguments around the configurable base: sessa_nofb is
    configured as `Sessa`, with feedback=False fixed."""
    if isinstance(factory, functools.partial):
        return functools.partial(configurable(factory.func), *factory.args, **factory.keywords)
    try:
        return gin.get_configurable(factory)
    except ValueError:  # not registered yet
        with gin.unlock_config():
            gin.register(factory)
        return gin.get_configurable(factory)


def _registry_hook(kind: str, name: str, factory: Factory) -> Factory:
    return configurable(factory)


for _cls in (MLP, SwiGLU, Stack, CausalLM, SequenceClassifier):
    configurable(_cls)
REGISTRY.add_hook(_registry_hook)
stack_module.set_layer_scope(gin.config_scope)
gin.add_config_file_search_path(str(CONFIGS_DIR))


class _QuietMissesFilter(logging.Filter):
    """gin's package-resource reader logs 'Path not found' for every search-path prefix it tries
    before the one that has the file; a file found nowhere still raises IOError naming every path."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                    and record.msg == "Path not found: %s")


logging.getLogger().addFilter(_QuietMissesFilter())


@gin.configurable
def build_model(model: Callable[[], nn.Module] = gin.REQUIRED) -> nn.Module:
    """Build the model a config names: `build_model.model = @CausalLM` (set by configs/base/*.gin)."""
    return model()


def parse(gin_files: Sequence[str] = (), gin_params: Sequence[str] = (), *, finalize: bool = True) -> None:
    """Start from an empty config, parse `gin_files` in order, then the `gin_params` bindings
    (later ones override earlier ones), and finalize (lock) the config unless `finalize=False`."""
    gin.clear_config()
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_params), finalize_config=finalize)


def clear() -> None:
    """Drop every binding (configurables stay registered); pattern layers built afterwards use defaults."""
    gin.clear_config()


def operative_config() -> str:
    """The bindings actually used by what was built so far (save it beside every result)."""
    return gin.operative_config_str()


def config_str() -> str:
    """Every binding parsed so far, used or not."""
    return gin.config_str()


def add_gin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add t5x-style `--gin_file` and `--gin_param` (both repeatable) to a command-line parser."""
    parser.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                        help="gin config file (repeatable; searched here, then in configs/)")
    parser.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                        help="gin binding applied after the files, e.g. \"DIM = 128\" (repeatable)")
    return parser


def parse_args(args: argparse.Namespace, default_files: Sequence[str] = ()) -> None:
    """`parse` the files and params of a parser set up by add_gin_args (`default_files` if none given)."""
    parse(args.gin_file or list(default_files), args.gin_param)
