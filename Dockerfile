# edge-kit build server: train, export, quantize, sign (and the fleet service). CPU-only PyTorch.
#   docker build -t edge-kit .
#   docker run --rm -v "$PWD:/work" -e EDGEKIT_IMAGE_DIGEST="$(docker inspect -f '{{index .RepoDigests 0}}' edge-kit)" \
#       edge-kit train --config examples/digits/edgekit.toml --json
# An image cannot contain its own digest, so the platform passes it in (EDGEKIT_IMAGE_DIGEST); the
# training run records it beside the lock file's sha256 (edge_kit/train/provenance.py).
#
# Pin the base by digest in CI (docker buildx imagetools inspect python:3.11.7-slim-bookworm) and pass it
# with --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
# torch==2.13.0+cpu in the lock comes from PyTorch's CPU wheel index, not from PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    EDGEKIT_LOCK_FILE=/opt/edge-kit/requirements/lock.txt

# git: the code leg of provenance (commit, dirty tree) and DVC's git integration.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edge-kit
# Dependencies first, from the lock only: this layer is rebuilt when the lock changes, not the code.
COPY requirements/lock.txt requirements/lock.txt
RUN python -m pip install "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" \
    && python -m pip install --extra-index-url "${TORCH_INDEX}" -r requirements/lock.txt

COPY pyproject.toml README.md ./
COPY edge_kit edge_kit
COPY calibration calibration
COPY device_agent device_agent
RUN python -m pip install --no-deps --no-build-isolation . \
    && edge-kit --help >/dev/null

RUN useradd --create-home --uid 1000 edgekit \
    && git config --system --add safe.directory '*'
USER edgekit
WORKDIR /work
ENTRYPOINT ["edge-kit"]
CMD ["--help"]
