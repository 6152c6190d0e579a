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

`parse` reports a bad config as GinConfigError naming the file and line (or the --gin_param
binding), and refuses a macro that nothing reads (`NUM_LAYER = 6` when the configs read
%NUM_LAYERS), which gin itself would ignore silently. A macro counts as read when a binding of
this config reads it, or when some config (in configs/ or among the files parsed) reads it as
%NAME: a file of shared settings may set macros that only some configs read.

A gin file can `import` any Python module, which runs that module's code: parse only config files
you trust, including the config.gin of run folders you did not create yourself.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

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


class GinConfigError(ValueError):
    """A config file or binding that cannot be parsed, or that sets something nothing reads."""


def parse(gin_files: Sequence[str] = (), gin_params: Sequence[str] = (), *, finalize: bool = True) -> None:
    """Start from an empty config, parse `gin_files` in order, then the `gin_params` bindings
    (later ones override earlier ones), and finalize (lock) the config unless `finalize=False`.

    Raises GinConfigError naming the file and line (or the binding) of a syntax error, an
    undefined macro or a macro that no binding reads; FileNotFoundError for a missing file."""
    gin_files, gin_params = [str(f) for f in gin_files], list(gin_params)
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(gin_files, gin_params, finalize_config=False)
        _check_macros_read(gin_files, gin_params)
        if finalize:
            gin.finalize()
    except SyntaxError as e:
        raise GinConfigError(_syntax_message(e, gin_files, gin_params)) from None
    except OSError as e:
        if "Unable to open file" in str(e):
            raise FileNotFoundError(f"gin: {e}") from None
        raise
    except ValueError as e:
        macro = re.search(r"No bindings specified for '([\w.]+)/gin\.macro'", str(e))
        if macro:
            name = macro.group(1)
            where = _mentions(f"%{name}", gin_files, gin_params)
            raise GinConfigError(f"gin macro %{name} is read{where} but never set: add `{name} = ...` to a config "
                                 f"file or --gin_param{_suggest(name, _macros_set())}") from None
        raise


def _syntax_message(e: SyntaxError, files: list[str], params: list[str]) -> str:
    """gin's SyntaxError names only the base name of the file (or nothing, for bindings)."""
    msg = e.msg if isinstance(e.msg, str) else str(e)
    line = f"line {e.lineno}" if e.lineno else "unknown line"
    text = f"\n    {e.text.rstrip()}" if isinstance(e.text, str) and e.text.strip() else ""
    if e.filename:
        found = [f for f in files if Path(f).name == Path(e.filename).name]
        where = found[0] if len(found) == 1 else e.filename
        where = _full_path(where)
        return f"gin syntax error in {where}, {line}: {msg}{text}"
    binding = params[e.lineno - 1] if e.lineno and 0 < e.lineno <= len(params) else "\n".join(params)
    return f"gin syntax error in --gin_param {binding!r}: {msg}"


def _full_path(name: str) -> str:
    """A config file as gin finds it: the working directory first, then configs/."""
    for candidate in (Path(name), CONFIGS_DIR / name):
        if candidate.is_file():
            return str(candidate.resolve())
    return name


def _macro_refs(value: Any, found: set[str]) -> set[str]:
    """The macros a binding value reads (%NAME), looking inside lists, tuples and dicts."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.config_key[1] == "gin.macro":
            found.add(value.config_key[0])
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            _macro_refs(item, found)
    elif isinstance(value, dict):
        for item in [*value.keys(), *value.values()]:
            _macro_refs(item, found)
    return found


def _macros_set() -> set[str]:
    return {scope for (scope, selector) in gin.config._CONFIG if selector == "gin.macro"}


_MACRO_READ = re.compile(r"%([A-Za-z_][\w.]*)")


@functools.lru_cache(maxsize=1)
def _macros_read_by_shipped_configs() -> frozenset[str]:
    return frozenset(m for path in CONFIGS_DIR.rglob("*.gin") for m in _MACRO_READ.findall(path.read_text()))


def _check_macros_read(files: list[str], params: list[str]) -> None:
    """Refuse macros that nothing reads (a misspelt name is ignored by gin): not this config's
    bindings, nor any shipped config, nor any of the files parsed."""
    read: set[str] = set()
    for bindings in gin.config._CONFIG.values():
        for value in bindings.values():
            _macro_refs(value, read)
    unread = _macros_set() - read - _macros_read_by_shipped_configs()
    for f in files:
        if Path(_full_path(f)).is_file():
            unread -= set(_MACRO_READ.findall(Path(_full_path(f)).read_text(errors="replace")))
    unread = sorted(unread)
    if unread:
        name = unread[0]
        where = _mentions(name, files, params, assignment=True)
        raise GinConfigError(f"gin macro {name} is set{where} but nothing reads it (no %{name} in any config), so "
                             f"it would change nothing{_suggest(name, read)}"
                             + (f"; also unread: {', '.join(unread[1:])}" if unread[1:] else ""))


def _mentions(token: str, files: list[str], params: list[str], assignment: bool = False) -> str:
    """' (in a.gin, --gin_param ...)' for the files and bindings whose text mentions `token`."""
    pattern = re.compile(rf"^\s*{re.escape(token)}\s*=" if assignment else re.escape(token) + r"\b", re.M)
    places = [_full_path(f) for f in files if Path(_full_path(f)).is_file()
              and pattern.search(Path(_full_path(f)).read_text(errors="replace"))]
    places += [f"--gin_param {p!r}" for p in params if pattern.search(p)]
    return f" (in {', '.join(places)})" if places else ""


def _suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""


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
