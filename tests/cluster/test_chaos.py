"""`pagedserve chaos`'s parts that need no server: the --kill and --hang syntax, and how
streams are judged against the fault-free run (a cancelled one must be a prefix of it; a token
sent twice or never sent is counted), and an error of its own calls, named by its phase, against
a fake server. tests/e2e/test_recovery.py runs it against a cluster."""

import subprocess
from concurrent import futures

import grpc
import pytest

from cluster.chaos import ChaosError, Fault, Stream, _report, problems, run
from cluster.client import Client
from protos import serving_pb2, serving_pb2_grpc


def test_kill_specs_parse_and_bad_ones_say_what_is_expected():
    assert Fault.parse("worker:1@300t") == Fault("worker", 1, after_tokens=300)
    assert Fault.parse("frontend@2.5s") == Fault("frontend", 0, at_s=2.5)
    for bad in ("worker", "gpu:1@2s", "replica:x@2s", "replica:1@2m", "worker@s", "worker:-1@2s"):
        with pytest.raises(ValueError, match="--kill"):
            Fault.parse(bad)
    assert Fault.parse("replica:1@2s", hang=True) == Fault("replica", 1, at_s=2.0, hang=True)
    assert Fault.parse("frontend@2s", hang=True) == Fault("frontend", 0, at_s=2.0, hang=True)
    with pytest.raises(ValueError, match="--hang 'gpu@2s': .* KIND one of"):
        Fault.parse("gpu@2s", hang=True)


def test_streams_are_judged_against_the_reference():
    reference = [[1, 2, 3, 4]] * 5
    streams = [
        Stream([1, 2, 3, 4], "length"),
        Stream([1, 2], cancelled=True),  # a prefix: fine
        Stream([1, 2, 2, 3, 4], "length"),  # a token sent twice
        Stream([1, 3, 4], "length"),  # a token never sent
        Stream([1], error="UNAVAILABLE: gone"),
    ]
    report = _report(streams, reference, {0: 0}, {0: 0}, {})
    assert (report.finished, report.cancelled) == (3, 1)
    assert report.lost == ["chaos-4: UNAVAILABLE: gone"]
    assert [line.split(":")[0] for line in report.mismatched] == ["chaos-2", "chaos-3"]
    assert (report.duplicated_tokens, report.missing_tokens) == (1, 1)
    assert "first difference at token 2" in report.mismatched[0]


def test_a_run_fails_for_each_problem_and_when_the_fault_missed_the_load():
    """A kill of a worker whose replica held no request proves nothing: the run fails, as it
    does for a lost request, a differing stream, blocks left in use or no recovery; a
    frontend's kill moves no request off a replica and needs none moved."""
    reference = [[1, 2]] * 2
    report = _report([Stream([1, 2], "length")] * 2, reference, {0: 0}, {0: 0}, {"kill": 1.0})
    kill, frontend = Fault("worker", at_s=1.0), Fault("frontend", at_s=1.0)
    report.num_recovered_requests = 2
    assert problems(report, [kill]) == []
    report.num_recovered_requests = 0
    assert problems(report, [kill]) == [
        "no request was on a failed replica when it failed: the fault missed the load (inject "
        "it earlier or ask for more tokens; a token trigger counts what this tool's client has "
        "received, which may lag far behind the server)"
    ]
    report.recovery_s = {}
    assert problems(report, [frontend]) == []
    broken = _report(
        [Stream([1], error="UNAVAILABLE: gone"), Stream([2, 1], "length")],
        reference,
        {0: 0},
        {0: 3},
        {},
    )
    broken.num_recovered_requests = 1
    assert problems(broken, [kill]) == [
        "1 requests were lost",
        "1 streams differ from the fault-free run",
        "blocks in use went {0: 0} -> {0: 3}",
        "1 failed replicas did not recover",
    ]


def test_on_gpu_workers_token_counts_are_compared_not_tokens():
    """A GPU's rounding follows the batch a fault changed: other greedy tokens of the same
    count pass there, a token sent twice or never sent does not."""
    reference = [[1, 2]] * 3
    streams = [Stream([2, 1], "length"), Stream([1, 2, 2], "length"), Stream([1], "length")]
    report = _report(streams, reference, {0: 0}, {0: 0}, {"kill": 1.0})
    report.num_recovered_requests = 1
    twice_and_never = "1 tokens duplicated and 1 missing against the fault-free run"
    kill = Fault("worker", at_s=1.0)
    assert problems(report, [kill]) == [twice_and_never, "3 streams differ from the fault-free run"]
    report.token_exact = False
    assert problems(report, [kill]) == [twice_and_never]
    assert "token counts compared, not tokens" in report.lines()[1]


class FailingServing(serving_pb2_grpc.ServingServicer):
    """A server whose every stream echoes its prompt, and which fails what `fails` names:
    "stream" (every Generate, after one delta), "status" (every GetServerInfo) or
    "wait-recovered" (GetServerInfo after its second answer); nothing else fails.
    GetServerInfo shows one recovering replica whose rank 0 has `pid`."""

    def __init__(self, fails: str, pid: int) -> None:
        self.fails, self.pid = fails, pid
        self.num_info_calls = 0

    def Generate(self, request, context):
        if self.fails == "stream":
            yield serving_pb2.GenerateResponse(token_ids=[1])
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        ids = list(request.prompt_token_ids.ids)
        yield serving_pb2.GenerateResponse(token_ids=ids, finish_reason="length")

    def GetServerInfo(self, request, context):
        self.num_info_calls += 1
        if self.fails == "status" or (self.fails == "wait-recovered" and self.num_info_calls > 2):
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        worker = serving_pb2.WorkerInfo(pid=self.pid)
        replica = serving_pb2.ReplicaInfo(state="recovering", workers=[worker], num_blocks=4)
        return serving_pb2.ServerInfoResponse(replicas=[replica])


CANCELLED = "CANCELLED: CANCELLED"  # what the soak's two unfinished rounds ended with


@pytest.mark.parametrize(
    "phase, what, error",
    [
        ("stream", "reference-0 of the fault-free reference run", CANCELLED),
        ("status", "blocks in use before the chaos run", CANCELLED),
        ("kill", "kill worker 0", "ProcessLookupError: [Errno 3] No such process"),
        ("wait-recovered", "kill worker 0", CANCELLED),
    ],
)
def test_an_error_of_the_tool_s_own_calls_names_its_phase(phase, what, error):
    victim = subprocess.Popen(["sleep", "60"])  # what the fault kills, but in phase "kill"
    pid = 2**31 - 1 if phase == "kill" else victim.pid  # beyond any pid_max: never a process
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    serving_pb2_grpc.add_ServingServicer_to_server(FailingServing(phase, pid), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client, pytest.raises(ChaosError) as err:
            run(client, [[1, 2]] * 2, 4, [Fault("worker", after_tokens=1)], timeout=2.0)
    finally:
        server.stop(grace=None)
        victim.kill()
        victim.wait(10)
    assert err.value.phase == phase
    assert str(err.value) == f"chaos {phase} ({what}): {error}"
