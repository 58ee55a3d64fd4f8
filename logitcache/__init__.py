"""logitcache: run a teacher once, cache its soft labels, train many students from the cache."""

__version__ = "0.1.0"
