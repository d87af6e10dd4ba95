#!/usr/bin/env python3
"""Validate the Prometheus Operator objects of rendered manifests, offline (no CRD schemas).

    check_prometheus_objects.py RENDERED.yaml CORE_OUT.yaml

Writes every object that is not ``monitoring.coreos.com`` to CORE_OUT.yaml (for
kubernetes-validate, which has no schema for custom resources) and checks the
PrometheusRule/PodMonitor objects against the fields the operator's CRDs define for what
kvroute uses; each PrometheusRule's groups also go through ``promtool check rules`` when promtool
is on PATH. Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import yaml

GROUP = "monitoring.coreos.com/"
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
GROUP_KEYS = {"name", "interval", "rules", "limit", "partial_response_strategy",
              "query_offset", "labels"}
ENDPOINT_KEYS = {"port", "portNumber", "targetPort", "path", "scheme", "interval",
                 "scrapeTimeout", "honorLabels", "honorTimestamps", "relabelings",
                 "metricRelabelings", "tlsConfig", "params", "enableHttp2", "filterRunning"}
PODMONITOR_KEYS = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                   "podTargetLabels", "sampleLimit", "targetLimit"}


def _strmap(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, str)
                                         for k, v in obj.items())


def check_rule_groups(spec: Any, where: str) -> list[str]:
    """Problems of a PrometheusRule spec (or a plain rules file)."""
    errs: list[str] = []
    if not isinstance(spec, dict) or set(spec) != {"groups"}:
        return [f"{where}: spec must hold exactly 'groups'"]
    names = set()
    for g in spec["groups"]:
        gname = g.get("name")
        if not gname or gname in names:
            errs.append(f"{where}: group without a unique name: {gname!r}")
        names.add(gname)
        errs += [f"{where}/{gname}: unknown group field {k!r}" for k in set(g) - GROUP_KEYS]
        for r in g.get("rules") or []:
            rid = r.get("alert") or r.get("record")
            errs += [f"{where}/{rid}: unknown rule field {k!r}" for k in set(r) - RULE_KEYS]
            if ("alert" in r) == ("record" in r):
                errs.append(f"{where}/{rid}: a rule needs exactly one of alert, record")
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                errs.append(f"{where}/{rid}: expr must be a non-empty string")
            for key in ("for", "keep_firing_for"):
                if key in r and not DURATION.match(str(r[key])):
                    errs.append(f"{where}/{rid}: {key}: not a duration: {r[key]!r}")
            for key in ("labels", "annotations"):
                if key in r and not _strmap(r[key]):
                    errs.append(f"{where}/{rid}: {key} must map strings to strings")
    return errs


def check_pod_monitor(spec: Any, where: str) -> list[str]:
    """Problems of a PodMonitor spec."""
    if not isinstance(spec, dict):
        return [f"{where}: spec must be a mapping"]
    errs = [f"{where}: unknown field {k!r}" for k in set(spec) - PODMONITOR_KEYS]
    if not isinstance(spec.get("selector"), dict):
        errs.append(f"{where}: selector is required")
    for ep in spec.get("podMetricsEndpoints") or []:
        errs += [f"{where}: unknown endpoint field {k!r}" for k in set(ep) - ENDPOINT_KEYS]
        if "interval" in ep and not DURATION.match(str(ep["interval"])):
            errs.append(f"{where}: interval: not a duration: {ep['interval']!r}")
    return errs


def promtool(spec: Any, where: str) -> list[str]:
    """``promtool check rules`` on the groups, when promtool is installed."""
    exe = shutil.which("promtool")
    if exe is None:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(spec, f)
        f.flush()
        out = subprocess.run([exe, "check", "rules", f.name], capture_output=True, text=True,
                             check=False)
    if out.returncode != 0:
        return [f"{where}: promtool check rules: {out.stdout}{out.stderr}".strip()]
    return []


def main(rendered: str, core_out: str) -> int:
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    core, errs = [], []
    for d in docs:
        if not str(d.get("apiVersion", "")).startswith(GROUP):
            core.append(d)
            continue
        where = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if d.get("apiVersion") != GROUP + "v1":
            errs.append(f"{where}: apiVersion must be {GROUP}v1")
        if not d.get("metadata", {}).get("name"):
            errs.append(f"{where}: metadata.name is required")
        extra = set(d) - {"apiVersion", "kind", "metadata", "spec"}
        errs += [f"{where}: unknown top-level field {k!r}" for k in extra]
        if d.get("kind") == "PrometheusRule":
            errs += check_rule_groups(d.get("spec"), where) or promtool(d["spec"], where)
        elif d.get("kind") == "PodMonitor":
            errs += check_pod_monitor(d.get("spec"), where)
        else:
            errs.append(f"{where}: kind not checked by this script")
    with open(core_out, "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    for e in errs:
        print(e)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
