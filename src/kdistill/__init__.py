"""kdistill: knowledge distillation for PyTorch."""

__version__ = "0.1.0"
