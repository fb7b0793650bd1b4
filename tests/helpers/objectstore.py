"""An S3 endpoint on 127.0.0.1 for tests: moto's server in a thread, with buckets and the
environment (credentials, endpoint) that s3fs picks up in this process and the worker
processes it starts."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

S3_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


@contextmanager
def s3_server() -> Iterator[str]:
    """Run moto's S3 server on a free loopback port; yields its endpoint URL. The environment
    variables s3fs reads are set for the duration (and restored)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in S3_ENVIRONMENT}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # an instance made before would keep the old endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        S3FileSystem.clear_instance_cache()


def new_bucket(prefix: str = "nb") -> str:
    """Create a bucket with a unique name on the current endpoint; returns ``s3://name``."""
    import fsspec

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


def upload_folder(folder: Path, url: str) -> None:
    """Copy a local folder tree to ``url`` (a prefix in a bucket), file by file."""
    import fsspec

    fs = fsspec.filesystem("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{url.removeprefix('s3://')}/{path.relative_to(folder).as_posix()}")
    fs.invalidate_cache()
