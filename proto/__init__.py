"""pdserve's wire contract: protobuf messages and gRPC services (`pdserve.proto`) and the modules
generated from it (`python -m proto.generate`)."""
