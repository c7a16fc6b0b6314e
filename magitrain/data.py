"""Choose the data source named by ``data.source``."""

from __future__ import annotations

from magitrain.batch import DataSource
from magitrain.config import Config


def build_data_source(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> DataSource:
    """``synthetic``: procedural clips (tests, smoke runs). ``webdataset``: shards (``data.shards``)."""
    if cfg.data.source == "synthetic":
        from magitrain.synthetic import SyntheticSource

        return SyntheticSource(cfg, dp_rank, dp_size)
    from magitrain.data_pipeline import build_webdataset_source

    return build_webdataset_source(cfg, dp_rank, dp_size)
