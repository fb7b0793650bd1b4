"""Schedulers of the same work units: local (in-process), Ray and Dask."""
