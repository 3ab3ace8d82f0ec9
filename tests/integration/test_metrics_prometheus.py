"""Prometheus (hack/versions.env, built by hack/build-stack.sh) scrapes the running operator's
/metrics on the local stack, and every query of the chart's Grafana dashboard returns data: the
dashboard's PromQL is valid for the pinned Prometheus and names series the operator really serves."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import localstack  # hack/ is on sys.path through tests/conftest.py
import pytest
import yaml

from tests import dashboard

from .conftest import OperatorProcess, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
JOB = "instructune-operator"
TUNE = "metrics"
PROGRESS = {"step": 120, "totalSteps": 400, "loss": 1.25, "tokensPerSecond": 3456.5}
# Panels whose series exist only once something went wrong: a healthy run leaves them empty
# ("No data" on the dashboard). Their queries must still be valid.
ONLY_AFTER_FAILURES = {"Kubernetes API errors"}
# Grafana's own variables, with values for a 1 s scrape interval.
GRAFANA = {"__rate_interval": "15s", "__range": "5m", "__interval": "1s"}


@pytest.fixture(scope="module")
def prometheus(operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping the operator process every second; its HTTP API's base URL."""
    localstack.ensure_programs(["prometheus"])
    work = tmp_path_factory.mktemp("prometheus")
    target = f"127.0.0.1:{operator.env['INSTRUCTUNE_METRICS_PORT']}"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = localstack.free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with (work / "prometheus.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                str(localstack.program("prometheus")),
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    try:
        wait_for(lambda: _ready(url) or proc.poll() is not None, 60, "Prometheus to be ready")
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited:\n{(work / 'prometheus.log').read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result; a query Prometheus refuses fails the test, naming it."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_answers_every_dashboard_query_with_the_operators_series(
    crd_installed: Any, operator: OperatorProcess, namespace: str, prometheus: str
) -> None:
    # A suspended tune: its passes run (event, then the timer's) without Ray; the job's progress
    # is written into its status as instructune_jobs.report writes it.
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = TUNE
    doc["spec"]["suspend"] = True
    crd_installed.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    wait_for(
        lambda: _phase(crd_installed, namespace) == "Suspended", 60, "the operator's first pass of the tune"
    )
    crd_installed.kubectl(
        "patch", "itune", TUNE, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"progress": PROGRESS}}),
    )  # fmt: skip

    # The next timer pass records the progress; Prometheus has scraped it, and enough samples of
    # every counter for a rate.
    selector = f'{{namespace="{namespace}", name="{TUNE}"}}'
    wait_for(lambda: _query(prometheus, f"instructune_tune_step{selector} == 120"), 60, "the tune's progress")
    assert _query(prometheus, f'up{{job="{JOB}"}} == 1')
    time.sleep(20)  # more than one $__rate_interval of samples

    board = dashboard.load()
    values = {**GRAFANA, "datasource": "", "namespace": namespace, "job": JOB}
    empty = []
    for query in dashboard.queries(board):
        result = _query(prometheus, dashboard.substitute(query.expr, values))
        if not result and query.panel not in ONLY_AFTER_FAILURES:
            empty.append(f"{query.panel}: {query.expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # The variables' choices: the tune's namespace and the operator's scrape job.
    for variable in dashboard.variables(board):
        response = httpx.get(
            f"{prometheus}/api/v1/label/{variable.label}/values",
            params={"match[]": variable.metric},
            timeout=10,
        )
        assert values[variable.name] in response.json()["data"], variable

    # Per tune: the gauges carry exactly what the status says.
    loss = _query(prometheus, f"instructune_tune_loss{selector}")
    assert [float(r["value"][1]) for r in loss] == [1.25]
    tunes = _query(prometheus, f'instructune_tunes{{namespace="{namespace}", phase="Suspended"}}')
    assert [float(r["value"][1]) for r in tunes] == [1.0]


def _phase(stack: Any, namespace: str) -> str | None:
    out = stack.kubectl("get", "itune", TUNE, "-n", namespace, "-o", "jsonpath={.status.phase}", check=False)
    return out.stdout.strip() or None
