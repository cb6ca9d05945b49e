# fedsto project image: runs the ServerApp and the ClientApps under `flower-superexec`
# (docker-compose.yml: services serverapp and clientapp-<i>). Legacy-builder compatible: no
# BuildKit features (no RUN --mount, no heredocs), so plain `docker build .` works everywhere.
#
#   docker build -t fedsto/app:local .
#   docker build -t fedsto/app:local --build-arg BASE_IMAGE=local/debian:bookworm .   # no registry
#   docker build -t fedsto/app:local --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# BASE_IMAGE: python:3.11-slim by default; any Debian/Ubuntu image works, one without Python gets
#   python3 + python3-venv from apt (e.g. a debootstrap-made local/debian:bookworm).
# TORCH_INDEX_URL: "" = torch from PyPI (x86_64: a CUDA build, several GB with its nvidia
#   libraries, works on CPU too); set it to another index (e.g. PyTorch's CPU-only one) for a
#   small image. TORCH_SPEC must name the torch/torchvision pins of pyproject.toml (a mismatch is
#   still installed correctly by the final `pip install`, just without this layer's cache).
# Behind a TLS-intercepting proxy: put its CA as deploy/extra-ca/*.crt (see the README there).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
# Build-time only (ARG, not ENV): pip and requests trust the system store, extra CAs included.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
ARG SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ARG DEBIAN_FRONTEND=noninteractive

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FEDSTO_HOME=/var/lib/fedsto \
    YOLO_OFFLINE=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# OS packages: the CA store, and Python itself only where the base image has none. (No libGL:
# OpenCV is the headless build, see below.)
RUN set -eux; \
    pkgs="ca-certificates"; \
    if ! command -v python3 >/dev/null 2>&1; then pkgs="$pkgs python3 python3-venv"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*

# Optional extra CA certificates (deploy/extra-ca/*.crt; the folder always exists in git).
COPY deploy/extra-ca/ /usr/local/share/ca-certificates/fedsto-extra/
RUN set -eux; \
    update-ca-certificates; \
    python3 -m venv /opt/venv; \
    useradd --uid 49999 --user-group --create-home --home-dir /home/app --shell /bin/sh app; \
    mkdir -p /data /var/lib/fedsto; \
    chown app:app /var/lib/fedsto

# Installs go through uv (a dependency of flwr anyway): 2.5 min instead of 6 min with pip for
# torch + its nvidia libraries + the rest on 2 cores. UV_NATIVE_TLS: trust the system store, extra
# CAs included. Heaviest layer first, so code and dependency changes do not download torch again.
ENV UV_NATIVE_TLS=1 UV_PYTHON=/opt/venv/bin/python UV_NO_CACHE=1 UV_COMPILE_BYTECODE=1
RUN set -eux; \
    pip install "uv<1"; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        uv pip install --extra-index-url "$TORCH_INDEX_URL" $TORCH_SPEC; \
    else \
        uv pip install $TORCH_SPEC; \
    fi

# The project's dependencies (from pyproject.toml, flwr pinned to 1.42.* there), then the project.
# Ultralytics also pulls in the GUI opencv-python, which shares the cv2 package with the headless
# build the project asks for; whichever is unpacked last wins. Reinstalling the headless one makes
# cv2 need no libGL (the GUI build would drag ~200 MB of Mesa/LLVM into the image).
COPY pyproject.toml README.md LICENSE /src/
RUN set -eux; \
    cd /src; \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt; \
    cat /tmp/requirements.txt; \
    uv pip install -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt; \
    headless="$(python3 -c "import importlib.metadata as m; print(m.version('opencv-python-headless'))")"; \
    uv pip install --reinstall --no-deps "opencv-python-headless==$headless"
# Albumentations asks PyPI for a newer version at import unless told not to.
ENV NO_ALBUMENTATIONS_UPDATE=1
COPY detection/ /src/detection/
COPY server/ /src/server/
COPY client/ /src/client/
COPY strategies/ /src/strategies/
COPY presets/ /src/presets/
RUN set -eux; \
    cd /src; \
    pip install --no-deps .; \
    pip check; \
    rm -rf /src/build /src/*.egg-info; \
    FEDSTO_HOME=/tmp/import-check python3 -c "import flwr, torch, ultralytics, cv2, detection, server, client, strategies; print('flwr', flwr.__version__, 'torch', torch.__version__)"; \
    rm -rf /tmp/import-check

# /data: site folders (mount read-only); /var/lib/fedsto: runs (ServerApp) and node-local state
# (ClientApp), FEDSTO_HOME. Flower's images use the same uid.
VOLUME ["/data", "/var/lib/fedsto"]
USER app
WORKDIR /home/app
CMD ["flower-superexec", "--help"]
