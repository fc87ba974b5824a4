"""jxent benchmarks: side-by-side comparisons with optax (``python -m benchmarks``)."""
