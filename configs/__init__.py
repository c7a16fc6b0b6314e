"""Config files shipped with magitrain (importable as ``magitrain.configs``)."""

import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def config_path(name: str) -> str:
    """Path of a shipped config, e.g. ``config_path("tiny.yaml")``."""
    path = os.path.join(CONFIG_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no shipped config {name!r}; have: {sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith('.yaml'))}")
    return path
