"""OUT, the folder `nucleibatch segment -o OUT` writes: its names and layout (:mod:`.folder`),
its writers (the zarr store, tables, checkpoints, atomic files), its lock and resume state, and
the one reader of a finished OUT (:mod:`.reader`)."""
