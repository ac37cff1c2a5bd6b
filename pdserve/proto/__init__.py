"""pdserve's wire contract: protobuf messages and gRPC services (`pdserve.proto`), the modules
generated from it (`python -m pdserve.proto.generate`), and the options every channel and server uses."""

MAX_MESSAGE_BYTES = 64 * 2**20
# gRPC's default 4 MiB receive limit is below one default-sized KV chunk plus its header.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
