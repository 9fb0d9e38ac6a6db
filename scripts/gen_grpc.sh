#!/usr/bin/env bash
# Regenerate the Python code of the Open Inference Protocol's gRPC service from its .proto
# (service/protocol/grpc_predict_v2.proto); the generated files are committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
uv run python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    service/protocol/grpc_predict_v2.proto
# The messages go into a private descriptor pool: the protocol's names (package `inference`)
# must not clash with another copy in the same process, such as tritonclient's in the tests.
sed -i 's/_descriptor_pool\.Default()/_descriptor_pool.DescriptorPool()/' \
    service/protocol/grpc_predict_v2_pb2.py
grep -q '_descriptor_pool.DescriptorPool()' service/protocol/grpc_predict_v2_pb2.py
