"""Datasets: built-in sources by name (`load_dataset`) and the user's own data (`from_arrays`,
`from_dataset`), all as `DatasetSplits` of uint8 (N, H, W, C) images (docs/data.md)."""

from ssl_lab.data.sources import DatasetSplits, Split, available_datasets, load_dataset
from ssl_lab.data.userdata import from_arrays, from_dataset

__all__ = ["DatasetSplits", "Split", "available_datasets", "from_arrays", "from_dataset",
           "load_dataset"]
