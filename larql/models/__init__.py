"""Model architectures, one readable module each."""
