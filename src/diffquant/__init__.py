"""diffquant: compression of diffusion models for edge GPUs (numerical core)."""

__version__ = "0.1.0"
