"""raymetric: train and validate image-retrieval feature extractors on Ray."""

__version__ = "0.1.0"
