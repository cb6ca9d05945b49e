# Small flwr-only image (no torch, no project code) for the SuperLink, the SuperNodes and the
# one-shot `credentials` and `register` services of docker-compose.yml. With a registry at hand
# the official images do the same job: flwr/superlink:1.42.0 and flwr/supernode:1.42.0 (they lack
# openssl/ssh-keygen and make-credentials.sh, which only the `credentials` service needs).
#
#   docker build -f deploy/superlink.Dockerfile -t fedsto/flwr:local .
#
# Same BASE_IMAGE and extra-CA handling as ../Dockerfile (deploy/extra-ca/*.crt).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG FLWR_SPEC="flwr==1.42.*"
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
ARG SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ARG DEBIAN_FRONTEND=noninteractive

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# openssl + ssh-keygen: deploy/make-credentials.sh (the `credentials` service).
RUN set -eux; \
    pkgs="ca-certificates openssl openssh-client"; \
    if ! command -v python3 >/dev/null 2>&1; then pkgs="$pkgs python3 python3-venv"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*

COPY deploy/extra-ca/ /usr/local/share/ca-certificates/fedsto-extra/
RUN set -eux; \
    update-ca-certificates; \
    python3 -m venv /opt/venv; \
    pip install "$FLWR_SPEC"; \
    flower-superlink --version; \
    useradd --uid 49999 --user-group --create-home --home-dir /home/app --shell /bin/sh app; \
    mkdir -p /state; \
    chown app:app /state

COPY deploy/make-credentials.sh /usr/local/bin/make-credentials.sh
RUN chmod 755 /usr/local/bin/make-credentials.sh

# /state: the SuperLink's database (--database /state/state.db).
VOLUME ["/state"]
USER app
WORKDIR /home/app
CMD ["flower-superlink", "--help"]
