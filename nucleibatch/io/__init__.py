"""Inputs and where data live: locations (local paths, fsspec URLs), discovery, image readers.
OUT is written by :mod:`nucleibatch.output`; annotated data (which may be an OUT) is read by
:mod:`nucleibatch.annotated`."""
