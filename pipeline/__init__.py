"""influence-ssl: label-free influence for self-supervised image encoders."""

__version__ = "0.1.0"
