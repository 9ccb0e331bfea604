"""larql: serve the experts of a Mixture-of-Experts language model from CPU-only machines."""

__version__ = "0.1.0"
