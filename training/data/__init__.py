"""Datasets and inputs: the raw layout, the synthetic set, downloads, augmentations, data checks."""
