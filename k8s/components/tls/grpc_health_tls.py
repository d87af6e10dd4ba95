"""Exec probe: grpc.health.v1 Check over TLS/mTLS (the kubelet's grpc probe speaks plaintext only).

Usage: python grpc_health_tls.py HOST:PORT SERVER_NAME
Certificates come from the server's own KVROUTE_TLS_* variables: the CA verifies the server and
the pod's certificate doubles as the client certificate that mTLS requires (issue it with both
server-auth and client-auth usages). Exit 0 when SERVING, 1 otherwise.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(var: str) -> bytes | None:
    path = os.environ.get(var, "")
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def main() -> int:
    target, server_name = sys.argv[1], sys.argv[2]
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read("KVROUTE_TLS_CA_FILE"),
        private_key=_read("KVROUTE_TLS_KEY_FILE"),
        certificate_chain=_read("KVROUTE_TLS_CERT_FILE"),
    )
    options = [("grpc.ssl_target_name_override", server_name)]
    try:
        with grpc.secure_channel(target, creds, options=options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3.0)
    except grpc.RpcError as exc:
        print(f"health check of {target} failed: {exc.code().name}: {exc.details()}")
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
