"""SSL losses as pure functions of embeddings z (V, N, D): V >= 2 views of N >= 2 samples.

Each computes in float32 even under autocast, returns a 0-dim tensor, and never gathers across
processes (ssl_lab.dist gathers before calling). Definitions are in each docstring.
"""

from .contrastive import mocov3, simclr, supcon
from .distillation import dino
from .predictive import byol, simsiam
from .redundancy import barlow_twins, multiview_barlow, multiview_vicreg, vicreg

__all__ = [
    "barlow_twins",
    "byol",
    "dino",
    "mocov3",
    "multiview_barlow",
    "multiview_vicreg",
    "simclr",
    "simsiam",
    "supcon",
    "vicreg",
]
