"""The Grafana dashboard ``dashboards/bella-worker.json`` against the metrics the code exports.

Ray 2.60 exports a ``ray.util.metrics`` metric named ``n`` as ``ray_n`` on its Prometheus
endpoint (counters end in ``_total``, histograms as ``_bucket``/``_sum``/``_count``, tags become
labels). The kinds are read from ``WorkerMetrics`` itself, built on fake Ray metric classes.
Serve and vLLM names are checked against the installed sources, where they are found.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ray_worker.metrics import METRIC_NAMES, WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "bella-worker.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class _FakeMetric:
    kind = ""

    def __init__(self, name: str, description: str = "", **kwargs: Any) -> None:
        self.name = name
        self.tag_keys = tuple(kwargs.get("tag_keys") or ())


class _FakeCounter(_FakeMetric):
    kind = "counter"


class _FakeGauge(_FakeMetric):
    kind = "gauge"


class _FakeHistogram(_FakeMetric):
    kind = "histogram"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


@pytest.fixture(scope="module")
def kinds() -> dict[str, str]:
    """Prometheus-side metric name (``ray_...``) -> counter, gauge or histogram."""
    from ray.util import metrics as rm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rm, "Counter", _FakeCounter)
        mp.setattr(rm, "Gauge", _FakeGauge)
        mp.setattr(rm, "Histogram", _FakeHistogram)
        made = WorkerMetrics(use_ray=True)._ray
    return {f"ray_{m.name}": m.kind for m in made.values()}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
        elif variable["type"] == "query":
            exprs.append(query)
    return exprs


def _names(expr: str, family: str) -> set[str]:
    return set(re.findall(rf"\b\w*{family}_\w+", expr))


def test_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used in variables or used.startswith("__"), (panel["title"], used)


def test_panels_fit_the_grid_without_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for dx in range(pos["w"]):
            for dy in range(pos["h"]):
                cell = (pos["x"] + dx, pos["y"] + dy)
                assert cell not in cells, (panel["title"], cells.get(cell))
                cells[cell] = panel["title"]


def test_every_worker_metric_has_a_panel(dashboard: dict[str, Any], kinds: dict[str, str]) -> None:
    assert set(kinds) == {f"ray_{name}" for name in METRIC_NAMES.values()}
    used = set().union(*(_names(e, "bella_worker") for e in _exprs(dashboard)))
    for name, kind in kinds.items():
        wanted = {name + s for s in HISTOGRAM_SUFFIXES} if kind == "histogram" else {name}
        assert used & wanted, f"no panel uses {name}"


def test_every_worker_expression_names_an_exported_metric(
    dashboard: dict[str, Any], kinds: dict[str, str]
) -> None:
    for expr in _exprs(dashboard):
        for name in _names(expr, "bella_worker"):
            assert name.startswith("ray_bella_worker_"), f"{name}: Ray exports it prefixed ray_"
            base = name
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in kinds:
                    base = name.removesuffix(suffix)
            assert base in kinds, f"{name} is not a metric of ray_worker.metrics"
            if kinds[base] == "histogram":
                assert base != name, f"{name} is a histogram: use _bucket, _sum or _count"
            if kinds[base] == "counter" and not expr.startswith("label_values("):
                assert re.search(rf"(rate|increase)\({re.escape(name)}\b", expr), expr


def _source_text(package: str, subdir: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / subdir
    return "".join(p.read_text(errors="replace") for p in sorted(root.glob("*.py")))


def _exported_base(name: str, prefix: str) -> list[str]:
    """Source names a Prometheus name may come from (minus ``ray_``, minus a type suffix)."""
    bare = name.removeprefix(prefix)
    candidates = [bare]
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        if bare.endswith(suffix):
            candidates.append(bare.removesuffix(suffix))
    return candidates


def test_serve_metric_names_exist_in_ray(dashboard: dict[str, Any]) -> None:
    source = _source_text("ray", "serve/_private")
    if source is None:
        pytest.skip("ray is not installed")
    names = set().union(*(_names(e, "ray_serve") for e in _exprs(dashboard)))
    assert names, "the dashboard shows no Serve metric"
    for name in names:
        assert any(f'"serve_{c}"' in source for c in _exported_base(name, "ray_serve_")), (
            f"{name}: no such metric in ray.serve"
        )


def test_vllm_metric_names_exist_in_vllm(dashboard: dict[str, Any]) -> None:
    source = _source_text("vllm", "v1/metrics")
    if source is None:
        pytest.skip("vllm is not installed")
    names = set().union(*(_names(e, "ray_vllm") for e in _exprs(dashboard)))
    assert names, "the dashboard shows no vLLM metric"
    for name in names:
        # vLLM's "vllm:x" reaches Ray as "vllm_x" (':' is not allowed), then "ray_vllm_x".
        assert any(f'"vllm:{c}"' in source for c in _exported_base(name, "ray_vllm_")), (
            f"{name}: no such metric in vllm"
        )
