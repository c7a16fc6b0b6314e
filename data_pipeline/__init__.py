"""WebDataset pipeline for magitrain (imported as ``magitrain.data_pipeline``).

shards -> (split by DP rank and loader worker, seeded shuffle, decode, bucket) -> packer ->
:class:`magitrain.batch.Batch`. Entry point for the trainer: :func:`build_webdataset_source`.
Modules: ``shard_format`` (what a shard holds), ``build_shards`` (CLI), ``media``, ``encoders``,
``text``, ``buckets`` (stages, shape buckets), ``prepare``, ``packer``, ``shards`` (lists and
assignment), ``dataset`` (the stateful per-worker stream), ``source`` (curriculum + loader).
"""

from magitrain.data_pipeline.source import WebDatasetSource, build_webdataset_source

__all__ = ["WebDatasetSource", "build_webdataset_source"]
