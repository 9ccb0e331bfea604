from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_standin import hub  # noqa: E402, F401  (fixture: the local Hugging Face Hub stand-in)
from tiny_models import build_model, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(name="small", seed=0, dtype="float32") -> (model, checkpoint dir).

    Cached per session so several test modules share one build."""
    cache: dict = {}

    def make(name: str = "small", seed: int = 0, dtype: str = "float32", **overrides):
        key = (name, seed, dtype, repr(sorted(overrides.items())))
        if key not in cache:
            model = build_model(name, seed, **overrides)
            out = tmp_path_factory.mktemp(f"ckpt-{name}-{seed}-{dtype}")
            save_checkpoint(model, out, dtype=dtype)
            cache[key] = (model, out)
        return cache[key]

    return make
