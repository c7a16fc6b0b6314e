"""WebDataset pipeline for magitrain (imported as ``magitrain.data_pipeline``)."""
