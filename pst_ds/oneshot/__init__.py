"""One-shot pruning from calibration data: block-by-block calibration and SparseGPT's OBS sweep."""
