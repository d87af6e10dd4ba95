"""Generated protobuf and gRPC stubs of protos/kvroute/v1 (do not edit; scripts/gen_protos.sh)."""
