"""Tensor Product Attention (arXiv 2501.06425) and the T6 model."""

__version__ = "0.1.0"
