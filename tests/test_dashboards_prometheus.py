"""The Grafana dashboard's queries, run through a real Prometheus that scrapes a live tiny server.

Grafana cannot run here, so this test does the part of Grafana's work that can break silently: it resolves the
dashboard variables, substitutes Grafana's interval macros and runs every panel query through Prometheus' HTTP
API. Each query must parse and return at least one finite value. Debian's prometheus package is installed when
the binary is missing (that needs root, which CI has).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from .live_server import free_port, live_server, tiny_settings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "matlora.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

SCRAPE_SECONDS = 1
# Grafana's macros, as it would set them for a short time range over a 1 s scrape interval.
MACROS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}
RANKS = (0, 1, 2, 4, 8, 16)


def panels_with_queries(dashboard: dict) -> list[dict]:
    """Return every panel that has queries, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel.get("targets"):
            found.append(panel)
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """Return (panel title and refId, PromQL expression) for every panel query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in panels_with_queries(dashboard) for target in panel["targets"]]


# --- the files alone ----------------------------------------------------------------------------------------


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in panels_with_queries(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"{panel['title']} has no description"
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'instance=~"$instance"' in expr, f"{panel['title']}: query ignores the instance variable"
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert window in ("$__rate_interval", "$__range"), f"{panel['title']}: fixed window [{window}]"


def test_dashboard_covers_required_metrics():
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in ("matlora_generation_tokens_total", "matlora_time_per_output_token_seconds_bucket",
                   "matlora_time_to_first_token_seconds_bucket", "matlora_rank_quality",
                   "matlora_rank_choices_total", "matlora_num_requests_waiting", "matlora_num_requests_running",
                   "matlora_batch_size", "matlora_kv_cache_usage_ratio", "matlora_requests_total",
                   "matlora_adapter_info"):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}" in exprs, quantile


def test_provisioning_matches_compose():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)

    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"

    provider = yaml.safe_load((PROVISIONING / "dashboards" / "matlora.yml").read_text())["providers"][0]
    grafana_volumes = [volume.split(":")[:2] for volume in services["grafana"]["volumes"]]
    assert ["./deploy/grafana/dashboards", provider["options"]["path"]] in grafana_volumes
    assert ["./deploy/grafana/provisioning", "/etc/grafana/provisioning"] in grafana_volumes

    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["server:8000"]


# --- a real Prometheus ----------------------------------------------------------------------------------------


def prometheus_binary() -> str:
    """Return the prometheus binary, installing Debian's package first when it is missing and we are root."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("prometheus is not installed and installing it needs root: run `apt-get install prometheus`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300, check=True)
        subprocess.run(install, env=env, capture_output=True, timeout=600, check=True)
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
    assert found, "apt-get installed prometheus but the binary is not on PATH"
    return found


class Prometheus:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict]:
        """Run an instant query and return its result list. A parse error fails with Prometheus' message."""
        response = self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", \
            f"{expr}\n-> HTTP {response.status_code}: {body.get('error')}"
        return body["data"]["result"]

    def label_values(self, label: str, selector: str) -> list[str]:
        response = self.client.get(f"/api/v1/label/{label}/values", params={"match[]": selector})
        response.raise_for_status()
        return response.json()["data"]

    def wait_ready(self, process: subprocess.Popen, timeout: float) -> None:
        """Wait for /-/ready: before it, the query API answers 503 with a plain-text body."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with code {process.returncode}; see its log")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus was not ready within {timeout:.0f} s")

    def wait_until(self, expr: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if any(float(item["value"][1]) >= 1 for item in self.query(expr)):
                    return
            except (httpx.HTTPError, AssertionError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"Prometheus returned no value >= 1 for {expr} within {timeout:.0f} s")


def run_mixed_load(url: str) -> None:
    """Send requests at every rank, by latency budget and by default, eight at a time so that ranks share steps."""
    bodies = [{"prompt": "Question: Tom has 3 apples", "rank": rank, "max_new_tokens": 8, "stop": []}
              for rank in RANKS]
    bodies += [{"prompt": "The quick brown fox", "max_new_tokens": 6}] * 6
    bodies += [{"prompt": "A train travels 60 miles", "latency_budget_ms": budget, "max_new_tokens": 6}
               for budget in (60_000, 0.000001)]

    def send(body: dict) -> int:
        with httpx.Client(base_url=url, timeout=30) as client:
            return client.post("/generate", json=body).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            statuses = list(pool.map(send, bodies))
            assert all(status == 200 for status in statuses), statuses


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = prometheus_binary()
    folder = tmp_path_factory.mktemp("prometheus")
    # Two running slots and lowering above one waiting request, so the load also lowers some ranks.
    settings = tiny_settings(max_num_seqs=2, profile_batch_sizes=[1, 2], lower_rank_under_load=True,
                             overload_waiting_threshold=1)
    with live_server(settings) as server:
        target = server.url.removeprefix("http://")
        config = {"global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": "5s"},
                  "scrape_configs": [{"job_name": "matlora", "static_configs": [{"targets": [target]}]}]}
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(folder / "prometheus.log", "wb")
        process = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            api = Prometheus(f"http://127.0.0.1:{port}")
            api.wait_ready(process, timeout=30)
            api.wait_until('up{job="matlora"}', timeout=30)
            run_mixed_load(server.url)
            # Three more scrapes, so the last requests are in the stored samples.
            time.sleep(3 * SCRAPE_SECONDS + 0.5)
            api.wait_until('sum(matlora_requests_total{outcome=~"stopped|length"})', timeout=10)
            yield api
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            log.close()


@pytest.fixture(scope="module")
def variables(prometheus) -> dict[str, str]:
    """Resolve the dashboard's query variables the way Grafana does, through Prometheus' label API."""
    dashboard = json.loads(DASHBOARD.read_text())
    resolved: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unsupported query {query}"
        selector = substitute(match.group(1), resolved)
        values = prometheus.label_values(match.group(2), selector)
        assert values, f"variable {variable['name']}: {query} found no values"
        if variable.get("includeAll") and variable.get("allValue"):
            resolved[variable["name"]] = variable["allValue"]
        else:
            resolved[variable["name"]] = values[0]
    return resolved


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(MACROS, key=len, reverse=True):
        expr = expr.replace(name, MACROS[name])
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


@pytest.mark.timeout(900)  # installing Debian's prometheus on a fresh machine is most of it
@pytest.mark.parametrize("title, expr", dashboard_queries(), ids=[title for title, _ in dashboard_queries()])
def test_panel_query_returns_data(prometheus, variables, title, expr):
    result = prometheus.query(substitute(expr, variables))
    assert result, f"{title}: no series for {expr}"
    values = [float(item["value"][1]) for item in result]
    assert any(math.isfinite(v) for v in values), f"{title}: only NaN or infinite values {values} for {expr}"


def test_load_lowered_some_ranks(prometheus, variables):
    """The mixed load must reach the lowering path, or the lowering panels would only ever show zeros."""
    result = prometheus.query('sum(matlora_rank_choices_total{reason="lowered_under_load"})')
    assert result and float(result[0]["value"][1]) >= 1
