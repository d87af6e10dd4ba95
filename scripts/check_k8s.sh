#!/usr/bin/env bash
# Render every kustomization under k8s/ (base, overlays, examples) offline with `kubectl kustomize`
# and validate every object strictly against the Kubernetes schemas with kubernetes-validate
# (1.31 and the newest version it ships). No API server is needed. Any warning fails: a
# deprecated kustomize field (commonLabels, ...), an unknown kind or field, a missing schema.
# Prometheus Operator objects (PrometheusRule, PodMonitor) have no schema there: they are checked
# by scripts/check_prometheus_objects.py (fields, durations; promtool check rules if installed).
# Custom resources (InferencePool) are validated strictly against the CRDs committed under
# k8s/crds/ by scripts/check_crd_objects.py; the rest goes to kubernetes-validate.
#   scripts/check_k8s.sh            (kubectl and kubernetes-validate on PATH; CI puts $VENV/bin first)
#   K8S_VERSIONS="1.31.0 1.34.0" scripts/check_k8s.sh
set -euo pipefail
cd "$(dirname "$0")/.."

command -v kubectl >/dev/null || { echo "check_k8s: kubectl not found on PATH" >&2; exit 1; }
python=${PYTHON:-python3}
command -v kubernetes-validate >/dev/null && python=$(dirname "$(command -v kubernetes-validate)")/python
if command -v kubernetes-validate >/dev/null; then
  validate=(kubernetes-validate)
else
  validate=("${PYTHON:-python3}" -m kubernetes_validate)
  "${validate[@]}" --version >/dev/null 2>&1 || {
    echo "check_k8s: kubernetes-validate not installed (pip install -e '.[test]')" >&2; exit 1; }
fi
newest=$("${validate[@]}" --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p' | head -1)
versions=${K8S_VERSIONS:-"1.31.0 ${newest:?cannot tell the newest schema version}"}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=0
count=0
# Every directory with a kustomization.yaml except components (they only build inside an overlay).
mapfile -t dirs < <(find k8s -name kustomization.yaml -not -path 'k8s/components/*' \
                      -printf '%h\n' | sort)
[[ ${#dirs[@]} -gt 0 ]] || { echo "check_k8s: no kustomizations under k8s/" >&2; exit 1; }
for dir in "${dirs[@]}"; do
  name=${dir//\//_}
  bad=0
  if ! kubectl kustomize "$dir" >"$out/$name.yaml" 2>"$out/$name.err"; then
    echo "FAIL $dir: kubectl kustomize failed:"; sed 's/^/  /' "$out/$name.err"; failed=1; continue
  fi
  if [[ -s "$out/$name.err" ]]; then
    echo "FAIL $dir: kustomize warned:"; sed 's/^/  /' "$out/$name.err"; bad=1
  fi
  objects=$(grep -c '^kind:' "$out/$name.yaml" || true)
  # Custom resources with a CRD under k8s/crds (InferencePool) are checked against its schema,
  # Prometheus Operator objects (no schema in kubernetes-validate) on their own; the rest below.
  if ! "$python" scripts/check_crd_objects.py --crds k8s/crds \
       --in "$out/$name.yaml" --rest "$out/$name.builtin.yaml" >"$out/$name.crd" 2>&1; then
    echo "FAIL $dir against k8s/crds:"; sed 's/^/  /' "$out/$name.crd"; bad=1
  fi
  if ! report=$("$python" scripts/check_prometheus_objects.py "$out/$name.builtin.yaml" \
                  "$out/$name.core.yaml" 2>&1); then
    echo "FAIL $dir: Prometheus Operator objects:"; echo "$report" | sed 's/^/  /'; bad=1
  fi
  for version in $versions; do
    report=$("${validate[@]}" --strict --quiet -k "$version" "$out/$name.core.yaml" 2>&1) && rc=0 || rc=$?
    if [[ $rc -ne 0 || -n "$report" ]]; then
      echo "FAIL $dir against Kubernetes $version:"; echo "$report" | sed 's/^/  /'; bad=1
    fi
  done
  if [[ $bad -eq 0 ]]; then
    echo "ok   $dir: $objects objects, strict schemas of Kubernetes $versions"
  fi
  failed=$((failed | bad))
  count=$((count + 1))
done
[[ $failed -eq 0 ]] || { echo "check_k8s: FAILED" >&2; exit 1; }
echo "check_k8s: $count kustomizations rendered and valid"
