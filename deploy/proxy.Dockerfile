# nginx in front of the SuperLink: the one port client sites dial (deploy/nginx.conf forwards
# only the Fleet API). Built from the same BASE_IMAGE as the other images because nginx:alpine may
# not be pullable; with a registry, `nginx:1.27` + `-v ./deploy/nginx.conf:/etc/nginx/nginx.conf:ro`
# does the same.
#
#   docker build -f deploy/proxy.Dockerfile -t fedsto/proxy:local .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive

# curl: the healthcheck.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends nginx-light ca-certificates curl; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    rm -f /etc/nginx/sites-enabled/default

COPY deploy/extra-ca/ /usr/local/share/ca-certificates/fedsto-extra/
RUN update-ca-certificates
COPY deploy/nginx.conf /etc/nginx/nginx.conf

EXPOSE 9443
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
