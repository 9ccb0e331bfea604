"""larql.models.load: the architecture comes from the vindex's model type."""

from __future__ import annotations

import json

import numpy as np
import pytest

from larql import models
from larql.demo import build_demo_vindex, demo_config
from larql.models.cache import KVCache
from larql.models.gemma4 import Gemma4Model
from larql.vindex import open_vindex


@pytest.fixture(scope="module")
def vindex(tmp_path_factory):
    cfg = demo_config(num_layers=2, hidden=64, num_experts=4, top_k=2)
    return open_vindex(build_demo_vindex(tmp_path_factory.mktemp("models") / "v", quant="f32", config=cfg))


def test_load_picks_the_class_of_the_vindex_model_type(vindex):
    model = models.load(vindex, dispatch="batch")
    assert type(model) is Gemma4Model and model.dispatch == "batch"
    cache = model.new_cache()
    assert isinstance(cache, KVCache)
    want = Gemma4Model(vindex, dispatch="batch").forward([2, 5, 7], Gemma4Model(vindex).new_cache())
    np.testing.assert_array_equal(model.forward([2, 5, 7], cache), want)


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    path = build_demo_vindex(tmp_path / "v", quant="f32", config=demo_config(num_layers=1, hidden=64,
                                                                            num_experts=4, top_k=2))
    index = json.loads((path / "index.json").read_text())
    index["model_config"]["model_type"] = "llama"
    (path / "index.json").write_text(json.dumps(index))
    vindex = open_vindex(path)
    assert vindex.config.model_type == "llama"
    with pytest.raises(models.UnsupportedModelError, match="'llama' is not supported.*gemma4_text"):
        models.load(vindex)
