# Stand-in for the Grafana image, for scripts/compose_smoke.sh: Grafana has no package this machine can install.
# It is not Grafana. It serves the mounted /etc/grafana folder (provisioning and dashboards) over HTTP, which
# shows that the compose mounts reach the container; the dashboard queries are checked against a real Prometheus
# by tests/test_dashboards_prometheus.py instead.
ARG BASE_IMAGE=matlora-smoke/debian:bookworm
FROM ${BASE_IMAGE}
RUN useradd --system --uid 472 grafana
USER grafana
CMD ["python3", "-m", "http.server", "3000", "--directory", "/etc/grafana"]
