"""Parallelism for magitrain (imported as ``magitrain.parallel``)."""
