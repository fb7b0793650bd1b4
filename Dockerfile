# The image for cluster nodes (Ray head and workers, Dask workers, KubeRay pods):
#   docker build -t registry.example.org/nucleibatch:0.1.0 . && docker push registry.example.org/nucleibatch:0.1.0
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t nucleibatch:0.1.0-cu126 .
# torch's CUDA wheels carry their CUDA runtime, so the host needs only the NVIDIA driver (and the
# NVIDIA container toolkit: `docker run --gpus all ...`). nucleibatch[all] (Ray, Dask, S3) is
# installed through constraints.txt, the versions CI tested.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=1 \
    MALLOC_MMAP_MAX_=0 \
    MALLOC_TRIM_THRESHOLD_=2147483647

# procps: ps/kill for Ray and Dask; wget: KubeRay's default probes; rsync, openssh-client: the Ray
# cluster launcher; tini reaps the workers' children
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps tini wget rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*

RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/nucleibatch
COPY pyproject.toml README.md constraints.txt ./
COPY nucleibatch ./nucleibatch
COPY jobs ./jobs
COPY cluster ./cluster
RUN pip install -c constraints.txt ".[all]" && nucleibatch --version

# a non-root user, as KubeRay and most clusters run pods
RUN useradd --create-home --uid 1000 ray
USER ray
WORKDIR /home/ray
ENTRYPOINT ["tini", "--"]
CMD ["bash"]
