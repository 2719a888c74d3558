"""histosurv: an inference runtime for multimodal (whole-slide image + genes) survival models."""

__version__ = "0.1.0"
