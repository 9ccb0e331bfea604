"""larql: serve the experts of a Mixture-of-Experts language model from CPU-only machines."""

__version__ = "0.1.0"

from .errors import LarqlError  # noqa: E402  (the root of every expected error; see errors.py)

__all__ = ["LarqlError", "__version__"]
