"""edgeq: turn a PyTorch model into verified, deployable edge artifacts."""

__version__ = "0.1.0"
