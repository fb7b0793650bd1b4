"""Process-wide machinery, set up by the engines and the entry points (never by a per-block step).

* :mod:`~nucleibatch.runtime.allocator`: glibc's allocator settings, for this process and the
  worker processes it starts, and handing freed heap pages back to the OS.
* :mod:`~nucleibatch.runtime.faults`: named fail points for fault-injection tests, armed by the
  environment variable ``NUCLEIBATCH_FAIL_AT``.
* :mod:`~nucleibatch.runtime.ray_start`: joining a Ray cluster or starting a private local Ray.

Nothing here imports the rest of nucleibatch: every layer may use it.
"""
