"""A worker's gRPC service without a model, for benchmarks and tests of the engine core: it is
brought up as a worker is (Health, InitDistributed, LoadModel, InitCache answer at once, as a
CPU rank of a model of `vocab_size` tokens and `max_model_len` positions would) and leaves
Execute, the tokens it samples, to its subclass."""

from protos import worker_pb2, worker_pb2_grpc


class ModellessRank(worker_pb2_grpc.WorkerServicer):
    def __init__(self, architecture: str, vocab_size: int, max_model_len: int) -> None:
        self.architecture = architecture
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def Health(self, request, context) -> worker_pb2.HealthResponse:
        return worker_pb2.HealthResponse(ready=True, device="cpu")

    def InitDistributed(self, request, context) -> worker_pb2.Empty:
        return worker_pb2.Empty()

    def LoadModel(self, request, context) -> worker_pb2.ModelInfo:
        return worker_pb2.ModelInfo(
            architecture=self.architecture,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_model_len,
        )

    def InitCache(self, request, context) -> worker_pb2.Empty:
        return worker_pb2.Empty()
