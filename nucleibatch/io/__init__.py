"""Inputs and where data live: locations (local paths, fsspec URLs), discovery, image readers, annotated data. OUT is written by :mod:`nucleibatch.output`."""
