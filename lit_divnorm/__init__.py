"""lit_divnorm: the unified divisive-normalization framework as PyTorch Lightning modules."""

__version__ = "0.1.0"
