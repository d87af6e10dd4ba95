#!/usr/bin/env bash
# Issue kvroute identities from a self-managed CA (openssl; for fleets without cert-manager).
#   scripts/issue_certs.sh ca                      -> ca.crt ca.key (once)
#   scripts/issue_certs.sh agent NODE_ID           -> agent-NODE_ID.crt/.key  (writes that node)
#   scripts/issue_certs.sh reader NAME             -> reader-NAME.crt/.key    (router, gateway, CLI)
#   scripts/issue_certs.sh admin NAME              -> admin-NAME.crt/.key     (operators: drain any node)
#   scripts/issue_certs.sh registry NAME           -> registry-NAME.crt/.key  (RouteShare relay only)
#   scripts/issue_certs.sh server NAME DNS[,DNS..] [ROLE/NAME]
#                                                  -> NAME.crt/.key           (registry/router serving;
#                                                     ROLE/NAME adds that identity, e.g. the
#                                                     registry's registry/kvroute-registry)
# Client certificates carry the identity as the URI SAN spiffe://$TRUST_DOMAIN/<role>/<name>
# (TRUST_DOMAIN defaults to kvroute = the registry's --auth-trust-domain). Files go to $OUT
# (default: the current directory). With SECRET_NAMESPACE=ns, each certificate is also stored as
# a Kubernetes Secret <name>-tls (type kubernetes.io/tls plus ca.crt), as components/tls expects.
set -euo pipefail
out=${OUT:-.}
domain=${TRUST_DOMAIN:-kvroute}
days=${DAYS:-90}
mkdir -p "$out"
cd "$out"

secret() {  # secret NAME
  [[ -n "${SECRET_NAMESPACE:-}" ]] || return 0
  kubectl -n "$SECRET_NAMESPACE" create secret generic "$1-tls" --type=kubernetes.io/tls \
    --from-file=tls.crt="$1.crt" --from-file=tls.key="$1.key" --from-file=ca.crt=ca.crt
}

issue() {  # issue NAME SAN USAGE
  [[ -f ca.crt && -f ca.key ]] || { echo "no ca.crt/ca.key in $out: run '$0 ca' first" >&2; exit 1; }
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" \
    -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nkeyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n' \
    "$2" "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -out "$1.crt" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
  chmod 0600 "$1.key"
  echo "issued $out/$1.crt ($2)"
  secret "$1"
}

role=${1:-}
case "$role" in
  ca)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -keyout ca.key -out ca.crt -subj "/CN=kvroute-ca" 2>/dev/null
    chmod 0600 ca.key
    echo "created $out/ca.crt and ca.key (keep ca.key offline)";;
  agent|reader|admin|registry)
    name=${2:?usage: $0 $role NAME}
    [[ "$name" =~ ^[A-Za-z0-9._:-]{1,128}$ ]] || { echo "bad name $name" >&2; exit 1; }
    issue "$role-$name" "URI:spiffe://$domain/$role/$name" clientAuth;;
  server)
    name=${2:?usage: $0 server NAME DNS[,DNS...]}
    dns=${3:?usage: $0 server NAME DNS[,DNS...]}
    sans="$(echo "DNS:$dns" | sed 's/,/,DNS:/g')"
    # registry/<name>: the registry relays to its peers with its own certificate (issue 19)
    [[ -z "${4:-}" ]] || sans="$sans,URI:spiffe://$domain/$4"
    # serverAuth and clientAuth: the TLS health probe presents the server's own certificate
    issue "$name" "$sans" serverAuth,clientAuth;;
  *)
    sed -n '2,15p' "$0" >&2; exit 2;;
esac
