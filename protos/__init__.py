"""Wire contracts: serving.proto (clients -> scheduler) and worker.proto (scheduler -> workers).

The generated stubs are committed beside their .proto files; `make protos` regenerates them and
tests/protos checks that they match a fresh generation, so they are never stale.
"""
