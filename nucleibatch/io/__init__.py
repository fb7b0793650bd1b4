"""Everything that opens files: readers, discovery, zarr stores, tables."""
