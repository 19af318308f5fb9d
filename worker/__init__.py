"""One process per GPU (or CPU): the Worker gRPC service, model runner, models, layers, loader."""
