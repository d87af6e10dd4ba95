#!/usr/bin/env python3
"""Validate custom resources in rendered manifests against the CRDs under k8s/crds/, offline.

kubernetes-validate knows only built-in kinds, so scripts/check_k8s.sh passes each rendered
kustomization through this script first: objects of a kind defined by a CRD in ``--crds`` are
checked against that CRD's ``openAPIV3Schema`` (JSON Schema, strictly: an unknown field is an
error, as ``kubectl apply --validate=strict`` makes it), and every other object is written to
``--rest`` for kubernetes-validate. CEL rules (``x-kubernetes-validations``) need an API server
and are not checked here.

    check_crd_objects.py --crds k8s/crds --in rendered.yaml --rest builtin.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields rejected wherever the CRD lists the known ones."""
    out: dict[str, Any] = {}
    for key, val in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {k: strict(v) for k, v in val.items()}
        elif key in ("items", "additionalProperties") and isinstance(val, dict):
            out[key] = strict(val)
        else:
            out[key] = val
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def load_crds(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, for every served version of every CRD."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    raw = version["schema"]["openAPIV3Schema"]
                    schema = strict(raw)
                    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crds", type=Path, required=True, help="folder of CRD YAML files")
    ap.add_argument("--in", dest="inp", type=Path, required=True, help="rendered manifests")
    ap.add_argument("--rest", type=Path, required=True,
                    help="write the objects of built-in kinds here")
    args = ap.parse_args()
    schemas = load_crds(args.crds)
    rest: list[Any] = []
    failed = checked = 0
    for obj in yaml.safe_load_all(args.inp.read_text()):
        if not obj:
            continue
        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        schema = schemas.get(key)
        if schema is None:
            group = key[0].split("/")[0]
            if any(g.split("/")[0] == group and k == key[1] for g, k in schemas):
                print(f"FAIL {key[1]} {obj['metadata'].get('name')}: apiVersion {key[0]} is "
                      f"not served by the CRD")
                failed += 1
                continue
            rest.append(obj)
            continue
        checked += 1
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
        name = f"{key[1]} {obj['metadata'].get('name')}"
        for err in errors:
            where = "/".join(str(p) for p in err.absolute_path) or "."
            print(f"FAIL {name}: {where}: {err.message}")
        failed += bool(errors)
    args.rest.write_text(yaml.safe_dump_all(rest, sort_keys=False))
    if checked:
        print(f"     {checked} custom resource(s) valid against k8s/crds"
              if not failed else f"     {failed} custom resource(s) invalid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
