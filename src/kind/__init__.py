"""kind-dit: KIND decomposable Diffusion Transformers (learngenes + tailors)."""

__version__ = "0.1.0"
