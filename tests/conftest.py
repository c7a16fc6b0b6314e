import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)
    yield


def tiny_config(tmp_path, *overrides):
    """configs/tiny.yaml with a run dir under tmp_path, quiet logging, and overrides."""
    from magitrain.config import load_config

    base = [f"run.dir={tmp_path}/run", "log.progress=false", "log.tensorboard=false"]
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), base + list(overrides))
