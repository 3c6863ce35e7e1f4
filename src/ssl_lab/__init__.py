"""ssl-lab: self-supervised learning research on images."""

__version__ = "0.1.0"
