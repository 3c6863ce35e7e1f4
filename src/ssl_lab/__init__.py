"""ssl-lab: self-supervised learning research on images.

The public API (docs/library.md): `load_config`, `train`, `evaluate`, `export_encoder`,
`load_exported`, and the subpackages `ssl_lab.models` (`from_module`, `build_backbone`),
`ssl_lab.data` (`from_arrays`, `from_dataset`, `load_dataset`) and `ssl_lab.losses` (pure loss
functions).
"""

__version__ = "0.1.0"

from ssl_lab import data, losses, models  # noqa: E402  (subpackages are part of the API)
from ssl_lab.api import Config, DatasetSplits, evaluate, load_config, train  # noqa: E402
from ssl_lab.export import export as export_encoder  # noqa: E402
from ssl_lab.export import load_exported  # noqa: E402

__all__ = ["Config", "DatasetSplits", "__version__", "data", "evaluate", "export_encoder",
           "load_config", "load_exported", "losses", "models", "train"]
