# Stand-in for the upstream Prometheus image, for scripts/compose_smoke.sh on machines that cannot pull images:
# Debian's prometheus package on a local Debian base. Same entry point and data folder as prom/prometheus.
ARG BASE_IMAGE=matlora-smoke/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus
USER prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
