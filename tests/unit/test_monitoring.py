"""The Grafana dashboard and both alert rule files reference only metrics the code exports, each
used as its type allows (rate() of counters and histogram series, never of gauges; quantiles of
histograms). The exported metrics come from the components' own metric classes, instantiated on
fresh CollectorRegistries, not from grepping the source. ``promtool check rules`` and
``promtool test rules`` run when promtool is installed (Debian package ``prometheus``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from engine_sim.engine import SimEngine
from engine_sim.metrics import make_registry
from engine_sim.settings import EngineSimSettings
from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaLog
from node_agent.events import ParseStats
from node_agent.metrics import AgentCollector, agent_registry
from node_agent.registry_link import LinkStats
from node_agent.usage import UsageProbe
from node_agent.zmq_source import SourceStats
from registry_service.metrics import RegistryMetrics
from registry_service.route_share import RouteShareHub
from registry_service.share_relay_link import RelayMetrics
from router_service.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "k8s" / "components" / "monitoring"
RULES = MON / "kvroute-rules.yaml"
OPERATOR_RULES = MON / "prometheusrule.yaml"
DASHBOARD = MON / "kvroute-dashboard.json"
PROMTOOL_TESTS = ROOT / "tests" / "promtool"

# PromQL words that are not metric names (functions, aggregations, keywords).
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "topk", "bottomk", "quantile", "rate", "irate",
    "increase", "delta", "deriv", "histogram_quantile", "clamp_min", "clamp_max", "abs",
    "absent", "changes", "resets", "max_over_time", "min_over_time", "avg_over_time",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "vector", "scalar", "time", "e", "inf", "nan",
}
RATE_FUNCS = ("rate", "irate", "increase")


def exported() -> dict[str, str]:
    """Metric family name -> type, from every component's metric classes."""
    regs: list[CollectorRegistry] = [RouterMetrics(CollectorRegistry()).registry,
                                     RegistryMetrics().registry]
    deltas = DeltaLog()
    regs.append(agent_registry(AgentCollector(
        ParseStats(), SourceStats(), BlockMap(16, deltas), LinkStats(),
        UsageProbe("", lambda: 0))))
    regs.append(make_registry(SimEngine(EngineSimSettings())))
    share = CollectorRegistry()  # the registry's RouteShare hub registers its own metrics
    RouteShareHub(registry=share)
    RelayMetrics(share)  # ... and its relay to the other registry replicas
    regs.append(share)
    out: dict[str, str] = {}
    for reg in regs:
        for fam in reg.collect():
            assert fam.name not in out, f"two components export {fam.name}"
            out[fam.name] = fam.type
    return out


def series_type(name: str, families: dict[str, str]) -> tuple[str, str] | None:
    """(family, type) a series name belongs to: ``X_total`` of counter X, ``X_bucket`` ... of
    histogram X, or gauge X itself."""
    for suffix, kinds in (("_total", ("counter",)), ("_bucket", ("histogram",)),
                          ("_sum", ("histogram", "summary")),
                          ("_count", ("histogram", "summary"))):
        if name.endswith(suffix):
            fam = name[: -len(suffix)]
            if families.get(fam) in kinds:
                return fam, families[fam] + suffix
    if families.get(name) in ("gauge", "unknown"):
        return name, "gauge"
    return None


def metric_refs(expr: str) -> list[tuple[str, str]]:
    """(metric name, enclosing function or '') for every metric in a PromQL expression."""
    e = expr.replace("$__rate_interval", "5m")
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)          # strings (label values, templates)
    e = re.sub(r"\{[^}]*\}", "", e)                      # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                     # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    refs = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        if word.lower() in PROMQL_WORDS or re.fullmatch(r"\d.*", word):
            continue
        before = e[: m.start()].rstrip()
        func = ""
        fm = re.search(r"([A-Za-z_]+)\s*\($", before)
        if fm:
            func = fm.group(1)
        refs.append((word, func))
    return refs


def rule_exprs(groups: dict[str, object]) -> Iterator[tuple[str, str]]:
    for g in groups["groups"]:  # type: ignore[index]
        for r in g["rules"]:
            yield r.get("alert") or r.get("record"), r["expr"]


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def all_exprs() -> list[tuple[str, str]]:
    plain = yaml.safe_load(RULES.read_text())
    operator = yaml.safe_load(OPERATOR_RULES.read_text())["spec"]
    return [*rule_exprs(plain), *rule_exprs(operator), *dashboard_exprs()]


def test_metric_extraction_sees_names_and_functions() -> None:
    refs = metric_refs('histogram_quantile(0.99, sum by (le, op) (rate(a_bucket{x="y"}[5m]))) '
                       '/ clamp_min(b_total, 1) > c and vllm:x')
    assert refs == [("a_bucket", "rate"), ("b_total", "clamp_min"), ("c", ""), ("vllm:x", "")]


def test_plain_rules_and_prometheusrule_hold_the_same_groups() -> None:
    plain = yaml.safe_load(RULES.read_text())
    operator = yaml.safe_load(OPERATOR_RULES.read_text())
    assert operator["apiVersion"] == "monitoring.coreos.com/v1"
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"] == plain


def test_every_referenced_metric_is_exported_with_the_right_type() -> None:
    families = exported()
    used: set[str] = set()
    problems = []
    for where, expr in all_exprs():
        refs = metric_refs(expr)
        assert refs, f"{where}: no metric in {expr!r}"
        for name, func in refs:
            found = series_type(name, families)
            if found is None:
                problems.append(f"{where}: {name} is not exported by kvroute or engine_sim")
                continue
            fam, kind = found
            used.add(fam)
            if kind == "gauge" and func in RATE_FUNCS:
                problems.append(f"{where}: {func}() of gauge {name}")
            if kind != "gauge" and func not in RATE_FUNCS:
                problems.append(f"{where}: {kind} series {name} used without rate/increase")
            if kind == "histogram_bucket" and "histogram_quantile" not in expr:
                problems.append(f"{where}: {name} outside histogram_quantile")
    assert not problems, "\n".join(problems)
    # The dashboard covers what the issue lists: one family of each kind at least.
    for fam in ("kvroute_router_predicted_cached_tokens", "vllm:prefix_cache_hits",
                "vllm:time_to_first_token_seconds", "kvroute_router_route_latency_seconds",
                "vllm:num_requests_running", "kvroute_router_degraded_decisions",
                "kvroute_router_registry_connected", "kvroute_router_registry_staleness_seconds",
                "kvroute_registry_index_entries", "kvroute_registry_heartbeats",
                "kvroute_registry_resyncs", "kvroute_registry_lease_expiries",
                "kvroute_agent_sequence_gaps", "kvroute_agent_parse_errors",
                "kvroute_agent_engine_metrics_scrape_errors"):
        assert fam in used, f"no panel or alert uses {fam}"


def test_alerts_cover_the_failures_that_matter_and_carry_a_runbook() -> None:
    plain = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in plain["groups"] for r in g["rules"] if "alert" in r}
    for name in ("KvrouteRoutingDegraded", "KvrouteRouterRegistryUnreachable",
                 "KvrouteIndexStale", "KvrouteAgentCannotReachEngine", "KvrouteNodeFlapping",
                 "KvrouteEtcdErrors", "KvrouteHitRateDrift"):
        assert name in alerts, name
    readme = (ROOT / "README.md").read_text()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"], name
        assert f"`{name}`" in readme, f"README does not describe alert {name}"
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p.get("description"), p["title"]
            assert f"**{p['title']}**" in readme, f"README does not describe panel {p['title']!r}"


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    (ds,) = dash["templating"]["list"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (apt-get install prometheus)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    tests = sorted(str(p) for p in PROMTOOL_TESTS.glob("*.yaml"))
    assert tests
    out = subprocess.run(["promtool", "test", "rules", *tests], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def _load_checker() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_prometheus_objects", ROOT / "scripts" / "check_prometheus_objects.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prometheus_object_check_catches_mistakes(tmp_path: Path) -> None:
    """scripts/check_prometheus_objects.py (run by check_k8s.sh) rejects what the CRD would."""
    mod = _load_checker()
    good = yaml.safe_load(RULES.read_text())
    assert mod.check_rule_groups(good, "rules") == []  # type: ignore[attr-defined]
    bad = {"groups": [{"name": "g", "rules": [
        {"alert": "A", "record": "r", "expr": "x", "for": "5 minutes",
         "labels": {"severity": 1}, "annotation": {}}]}]}
    errs = " ".join(mod.check_rule_groups(bad, "rules"))  # type: ignore[attr-defined]
    for want in ("unknown rule field 'annotation'", "exactly one of alert, record",
                 "for: not a duration", "labels must map strings to strings"):
        assert want in errs, want
    assert mod.check_pod_monitor({"podMetricsEndpoints": [{"prot": "metrics"}]},  # type: ignore[attr-defined]
                                 "pm") == ["pm: selector is required",
                                           "pm: unknown endpoint field 'prot'"]
    rendered = tmp_path / "all.yaml"
    rendered.write_text(OPERATOR_RULES.read_text() + "---\n" + yaml.safe_dump(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}))
    core = tmp_path / "core.yaml"
    assert mod.main(str(rendered), str(core)) == 0  # type: ignore[attr-defined]
    assert [d["kind"] for d in yaml.safe_load_all(core.read_text())] == ["ConfigMap"]
