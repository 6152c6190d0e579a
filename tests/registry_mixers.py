"""The mixers the invariant tests cover: every entry of `zoo.registry.REGISTRY` when the tests are collected.

tests/test_blocks.py (causality, gradients, backend-independence), tests/test_cache.py (decode ==
forward), tests/test_packing.py (packed == separate) and tests/test_generate.py parametrize over
`names()`. A mixer registered before collection, by the library or by a module that a conftest.py
or a pytest plugin (`pytest -p my_mixers`) imports, is covered without editing any test; one that
cannot meet an invariant declares it in `invariant_exemptions` (blocks.mixer.INVARIANTS) and its
test is skipped with the declared reason.
"""

from __future__ import annotations

from typing import Callable

import pytest

from blocks.mixer import INVARIANTS, Mixer
from zoo.registry import REGISTRY

# Small sizes that keep the suite fast and still exercise what matters (several heads, grouped
# key/value heads, chunks shorter than the test sequences, a window shorter than them, the optional
# short convs of GLA). A mixer not listed here is built with its defaults.
TEST_OPTIONS = {
    "sessa": dict(num_heads=2, num_kv_heads=1),
    "sessa_nofb": dict(num_heads=2),
    "attention": dict(num_heads=2, num_kv_heads=1),
    "sliding_window": dict(num_heads=2, window=3),
    "mamba2": dict(head_dim=16, state_dim=8, chunk_size=4),
    "gated_deltanet": dict(num_heads=2, chunk_size=4),
    "deltanet": dict(num_heads=2, chunk_size=4),
    "gla": dict(num_heads=2, chunk_size=4, use_short_conv=True),
    "retnet": dict(num_heads=2, chunk_size=4),
}


def names() -> list[str]:
    """Every registered mixer, in registration order."""
    return list(REGISTRY.mixers)


def factory(name: str) -> Callable[[int], Mixer]:
    """dim -> the registered mixer `name` at its test size."""
    source = REGISTRY.mixer(name).source
    return lambda dim: source(dim, **TEST_OPTIONS.get(name, {}))


def skip_if_exempt(mixer: Mixer, name: str, invariant: str) -> None:
    """Skip the running test, with the reason, if `mixer` declares it does not meet `invariant`."""
    assert invariant in INVARIANTS, invariant
    reason = getattr(mixer, "invariant_exemptions", {}).get(invariant)
    if reason is not None:
        pytest.skip(f"{name} declares it does not meet {invariant!r}: {reason}")
