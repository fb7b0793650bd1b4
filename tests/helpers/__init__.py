"""Plain helpers shared by the test modules (fixtures live in tests/conftest.py).

A test module imports from here, never from another test module. One topic per module:
``paths`` (where the repository and its data are), ``input_files`` (writers of every input
kind), ``bad_corpus`` (the bad-inputs corpus), ``outputs`` (reading and comparing OUT folders),
``measurements`` (measurement columns and awkward label shapes), ``labels`` (label images),
``training`` (tiny `train` runs and what they write), ``processes`` (child processes and their
environment), ``objectstore`` (an S3 endpoint on 127.0.0.1), ``raycluster`` (a Ray head on
127.0.0.1).
"""
