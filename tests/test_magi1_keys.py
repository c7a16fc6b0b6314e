"""The published-size configs build MAGI-1's exact parameter set (names, shapes, counts).

Built on the meta device (no memory). The expected key sets were measured from MAGI-1's own
model code (shared/docs/magi1_keys).
"""

import json
import math
import os

import pytest
import torch

from magitrain.config import load_config
from magitrain.model import MagiDiT

from conftest import REPO, SHARED

KEYS = os.path.join(SHARED, "docs", "magi1_keys")
CASES = [("magi1_4.5b.yaml", "4.5B.json", 4_459_898_128), ("magi1_24b.yaml", "24B.json", 23_899_281_936)]


@pytest.mark.parametrize("config,keys,total", CASES)
def test_published_config_has_magi1_keys(config, keys, total):
    if not os.path.exists(os.path.join(KEYS, keys)):
        pytest.skip("MAGI-1 key lists not present")
    with open(os.path.join(KEYS, keys)) as f:
        expected = json.load(f)
    cfg = load_config(os.path.join(REPO, "configs", config))
    with torch.device("meta"):
        model = MagiDiT(cfg.model)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(math.prod(s) for s in expected.values()) == total
    assert all(p.is_meta for p in model.parameters())
