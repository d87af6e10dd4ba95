#!/usr/bin/env python3
"""Image build step: delete the modules of xds-protos that kvroute never imports.

xds-protos ships generated code for all of Envoy's and xDS's APIs (~1,800 modules, ~4.5 MB of
source, about twice that once compiled), of which the endpoint picker imports ~40 (the ext_proc
service and what its descriptors depend on). This imports ``router_service.epp.server`` —
protobuf modules import their dependencies when loaded, so that is the whole closure — and
deletes every other ``.py`` file of the distribution, keeping package ``__init__.py`` files.
The Dockerfile runs it before ``compileall``; the build-stage test imports the picker after it.

    prune_xds_protos.py [--dry-run]
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path


def main() -> int:
    dry = "--dry-run" in sys.argv[1:]
    dist = importlib.metadata.distribution("xds-protos")
    importlib.import_module("router_service.epp.server")
    loaded = {Path(m.__file__).resolve() for m in list(sys.modules.values())
              if getattr(m, "__file__", None)}
    kept = removed = freed = 0
    for f in dist.files or []:
        if not str(f).endswith(".py"):
            continue
        path = Path(str(dist.locate_file(f))).resolve()
        if path.name == "__init__.py" or path in loaded or not path.exists():
            kept += 1
            continue
        removed += 1
        freed += path.stat().st_size
        if not dry:
            path.unlink()
    verb = "would remove" if dry else "removed"
    print(f"prune_xds_protos: {verb} {removed} modules ({freed / 1e6:.1f} MB), kept {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
