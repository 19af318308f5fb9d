"""`pagedserve chaos`: faults injected into a running server under streaming load, and what the
clients saw of them.

    reference   N greedy requests of token-id prompts (ignore_eos), fault-free, all at once
    chaos run   the same N again, streaming; some cancelled at random after a random number of
                tokens; at chosen moments (seconds after the start, or once the streams have
                received so many tokens) a worker, every worker of a replica, or a frontend is
                killed with SIGKILL, or hung with SIGSTOP (alive, silent);
                pids from GetServerInfo: this host's processes only
    report      requests finished / cancelled / lost (ended with an error), tokens duplicated
                or missing against the reference (a cancelled stream must be a prefix of it),
                each pool's used blocks before and after (once the server has settled), and
                each killed or hung replica's time to serve again with new workers, and any
                hung process the server left alive (the tool kills it: nothing stays stopped)

Greedy decoding makes the reference exact, so any token repeated, dropped or changed by the
recovery shows up.

An error of the tool's own calls (not a measured stream's: those are counted as lost) ends the
run with a ChaosError naming its phase: submit (sending a request), stream (reading one of the
reference run), status (GetModelInfo / GetServerInfo), kill (finding and signalling a fault's
processes) or wait-recovered (waiting for a fault's replica to serve again).
"""

import argparse
import contextlib
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc

from cluster.client import Client
from protos import serving_pb2
from scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)

KINDS = ("worker", "replica", "frontend")
HANG_KINDS = KINDS  # the core fails a hung worker's replica and kills a hung frontend
_GONE_WITHIN_S = 10.0  # the server kills a hung process within this (its replica recovered)
_POLL_S = 0.1  # how often GetServerInfo is asked while waiting on the server


PHASES = ("submit", "stream", "status", "kill", "wait-recovered")


class ChaosError(RuntimeError):
    """A call of the chaos tool itself failed; the message names the phase and what it did."""

    def __init__(self, phase: str, what: str, error: str) -> None:
        assert phase in PHASES, phase
        super().__init__(f"chaos {phase} ({what}): {error}")
        self.phase = phase


@contextlib.contextmanager
def _phase(phase: str, what: str):
    """Turns an RPC's (or a signal's) error into a ChaosError naming phase and what."""
    try:
        yield
    except grpc.RpcError as e:
        raise ChaosError(phase, what, f"{e.code().name}: {e.details()}") from e
    except OSError as e:
        raise ChaosError(phase, what, f"{type(e).__name__}: {e}") from e


def _server_info(client: Client, what: str) -> serving_pb2.ServerInfoResponse:
    with _phase("status", what):
        return client.server_info()


@dataclass(frozen=True)
class Fault:
    """Kill `kind` ("worker": rank 0 of the replica, "replica": all its ranks, "frontend": the
    target-th frontend) at_s seconds after the chaos run starts, or once the streams have
    received after_tokens tokens in all; hang: stop it (SIGSTOP) instead, alive but silent."""

    kind: str
    target: int = 0
    at_s: float | None = None
    after_tokens: int | None = None
    hang: bool = False

    @classmethod
    def parse(cls, text: str, hang: bool = False) -> "Fault":
        """KIND[:TARGET]@WHEN, WHEN "2.5s" (seconds) or "300t" (tokens): "worker:1@300t"."""
        option, kinds = ("--hang", HANG_KINDS) if hang else ("--kill", KINDS)
        what, sep, when = text.partition("@")
        kind, _, target = what.partition(":")
        if kind not in kinds or not sep or not when[:-1] or when[-1] not in "st":
            raise ValueError(
                f"{option} {text!r}: expected KIND[:TARGET]@WHEN with KIND one of {kinds} and "
                "WHEN seconds (2.5s) or streamed tokens (300t)"
            )
        try:
            number, index = float(when[:-1]), int(target or 0)
        except ValueError:
            raise ValueError(f"{option} {text!r}: TARGET and WHEN must be numbers") from None
        if number < 0 or index < 0:
            raise ValueError(f"{option} {text!r}: TARGET and WHEN must be >= 0")
        if when[-1] == "s":
            return cls(kind, index, at_s=number, hang=hang)
        return cls(kind, index, after_tokens=int(number), hang=hang)

    def __str__(self) -> str:
        return f"{'hang' if self.hang else 'kill'} {self.kind} {self.target}"


@dataclass
class Stream:
    """What one chaos request's client got."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""  # the status that ended it, if one did
    cancelled: bool = False


@dataclass
class Report:
    num_requests: int
    finished: int  # answered in full, with a finish reason
    cancelled: int  # cancelled by this tool
    lost: list[str]  # "request: status" of those ended by an error
    mismatched: list[str]  # "request: what differs" against the reference
    duplicated_tokens: int  # tokens beyond the reference's (a token sent twice)
    missing_tokens: int  # tokens of the reference never received
    blocks_before: dict[int, int]  # replica id -> blocks in use before the chaos run
    blocks_after: dict[int, int]  # ... and once the server settled after it
    recovery_s: dict[str, float]  # fault -> seconds until its replica served again
    num_recovered_requests: int  # requests the server moved off failed replicas meanwhile
    outputs: dict[str, Stream]
    # Hung (stopped) pids still alive _GONE_WITHIN_S after their replica served again, or when
    # the run ended: the server did not kill them (this tool did).
    hung_left_alive: list[int] = field(default_factory=list)
    # Every worker on a CPU, where a step's numerics do not depend on the batch beside a
    # request: its greedy tokens must equal the fault-free run's. On GPUs a fault changes the
    # batches (requests moved, recomputed), the batch changes the kernels' rounding, and in
    # bf16 that flips greedy tokens of random weights within a few tokens (as TP=2 against
    # TP=1 does, BENCHMARKS.md): there only the count of tokens is compared.
    token_exact: bool = True

    def lines(self) -> list[str]:
        out = [
            f"requests: {self.num_requests}, finished {self.finished}, cancelled "
            f"{self.cancelled}, lost {len(self.lost)}",
            f"against the fault-free run: {len(self.mismatched)} differ, "
            f"{self.duplicated_tokens} tokens duplicated, {self.missing_tokens} missing"
            + ("" if self.token_exact else " (GPU workers: token counts compared, not tokens)"),
            f"blocks in use before: {self.blocks_before}, after: {self.blocks_after}",
            f"requests moved off failed replicas: {self.num_recovered_requests}",
        ]
        out += [f"recovered {fault} in {s:.1f} s" for fault, s in self.recovery_s.items()]
        out += [f"hung pid {pid} was left alive by the server" for pid in self.hung_left_alive]
        out += [f"lost {line}" for line in self.lost]
        out += [f"differs {line}" for line in self.mismatched]
        return out


def problems(report: Report, faults: list[Fault]) -> list[str]:
    """Why the run fails, one sentence each; none: it passed (nothing lost, every stream equal
    to the fault-free run (in length only on GPU workers: Report.token_exact), blocks back,
    every failed replica serving again with the requests it held moved, no hung process left
    alive by the server)."""
    out = []
    if report.lost:
        out.append(f"{len(report.lost)} requests were lost")
    if report.duplicated_tokens or report.missing_tokens:
        out.append(
            f"{report.duplicated_tokens} tokens duplicated and {report.missing_tokens} missing "
            "against the fault-free run"
        )
    if report.mismatched and report.token_exact:
        out.append(f"{len(report.mismatched)} streams differ from the fault-free run")
    if report.blocks_after != report.blocks_before:
        out.append(f"blocks in use went {report.blocks_before} -> {report.blocks_after}")
    on_replicas = [f for f in faults if f.kind != "frontend"]
    if len(report.recovery_s) != len(on_replicas):
        out.append(f"{len(on_replicas) - len(report.recovery_s)} failed replicas did not recover")
    if on_replicas and report.num_recovered_requests == 0:
        out.append(
            "no request was on a failed replica when it failed: the fault missed the load "
            "(inject it earlier or ask for more tokens; a token trigger counts what this "
            "tool's client has received, which may lag far behind the server)"
        )
    if report.hung_left_alive:
        out.append(f"hung processes {report.hung_left_alive} were left alive by the server")
    return out


def blocks_in_use(info: serving_pb2.ServerInfoResponse) -> dict[int, int]:
    return {r.replica_id: r.num_blocks - r.num_free_blocks for r in info.replicas}


def run(
    client: Client,
    prompts: list[list[int]],
    max_tokens: int,
    faults: list[Fault],
    cancel_fraction: float = 0.0,
    seed: int = 0,
    reference: list[list[int]] | None = None,
    timeout: float = 300.0,
) -> Report:
    """The chaos run (after a fault-free reference run, unless one is given) and its report;
    waits up to timeout for the streams and again for the server to settle."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if reference is None:
        reference = _reference(client, prompts, params, timeout)
    info = _server_info(client, "blocks in use before the chaos run")
    before, recovered = blocks_in_use(info), info.num_recovered_requests
    workers = [w for r in info.replicas for w in r.workers]
    rng = random.Random(seed)
    cancel_at = {
        i: rng.randrange(1, max_tokens)
        for i in range(len(prompts))
        if max_tokens > 1 and rng.random() < cancel_fraction
    }
    streams = [Stream() for _ in prompts]
    received = _Counter()
    threads = [
        threading.Thread(
            target=_stream,
            args=(client, f"chaos-{i}", prompt, params, timeout, cancel_at.get(i), s, received),
            daemon=True,
        )
        for i, (prompt, s) in enumerate(zip(prompts, streams, strict=True))
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    recovery = _Injector(client, faults, start, received, timeout)
    for thread in threads:
        thread.join(timeout)
    recovery_s = recovery.join()
    after = _settled(client, before, timeout)
    report = _report(streams, reference, before, after, recovery_s)
    moved = _server_info(client, "requests moved off failed replicas").num_recovered_requests
    report.num_recovered_requests = moved - recovered
    report.hung_left_alive = recovery.hung_left_alive
    report.token_exact = all(w.device.startswith("cpu") for w in workers)
    return report


def _reference(client, prompts, params, timeout) -> list[list[int]]:
    """The fault-free run, all requests at once: "reference-I" (ids a server's log shows)."""
    ids = [f"reference-{i}" for i in range(len(prompts))]
    with _phase("submit", "the fault-free reference run"):
        calls = [
            client.generate(p, params, rid, timeout) for p, rid in zip(prompts, ids, strict=True)
        ]
    tokens = []
    for rid, call in zip(ids, calls, strict=True):
        with _phase("stream", f"{rid} of the fault-free reference run"):
            tokens.append([t for delta in call for t in delta.token_ids])
    return tokens


class _Counter:
    """Tokens the streams have received in all; waiters wake as it grows."""

    def __init__(self) -> None:
        self.value = 0
        self._cond = threading.Condition()

    def add(self, n: int) -> None:
        with self._cond:
            self.value += n
            self._cond.notify_all()

    def wait_for(self, target: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.value >= target, timeout)


def _stream(client, request_id, prompt, params, timeout, cancel_after, out: Stream, received):
    """One measured stream: what ends it, error included, is recorded in out."""
    try:
        call = client.generate(prompt, params, request_id, timeout=timeout)
        for delta in call:
            out.tokens += delta.token_ids
            received.add(len(delta.token_ids))
            if delta.finish_reason:
                out.finish_reason = delta.finish_reason
            if cancel_after is not None and len(out.tokens) >= cancel_after:
                out.cancelled = True
                call.cancel()
                return
    except grpc.RpcError as e:
        if not out.cancelled:
            out.error = f"{e.code().name}: {e.details()}"


class _Injector:
    """Fires each fault at its moment on a thread of its own, then times its replica's
    recovery (serving again, with none of the killed pids). join() raises the first error a
    fault's thread met: a ChaosError, or a ValueError (a fault naming no such replica)."""

    def __init__(self, client, faults, start, received, timeout) -> None:
        self.recovery_s: dict[str, float] = {}
        self.hung_left_alive: list[int] = []
        self._errors: list[ChaosError | ValueError] = []
        self._threads = [
            threading.Thread(
                target=self._fire, args=(client, f, start, received, timeout), daemon=True
            )
            for f in faults
        ]
        for thread in self._threads:
            thread.start()

    def join(self) -> dict[str, float]:
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        return self.recovery_s

    def _fire(self, client, fault: Fault, start, received, timeout) -> None:
        try:
            self._inject(client, fault, start, received, timeout)
        except (ChaosError, ValueError) as e:
            log.error("%s", e)
            self._errors.append(e)

    def _inject(self, client, fault: Fault, start, received, timeout) -> None:
        if fault.after_tokens is not None:
            received.wait_for(fault.after_tokens, timeout)
        else:
            time.sleep(max(start + fault.at_s - time.monotonic(), 0))
        killed_at = time.monotonic()
        with _phase("kill", str(fault)):
            pids = _pids(client.server_info(), fault)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP if fault.hang else signal.SIGKILL)
        log.warning("%s: pids %s", fault, pids)
        if fault.kind == "frontend":  # nothing to recover: its clients' streams are lost
            if fault.hang:  # the core should have killed it; none is left stopped
                self.hung_left_alive += _kill_survivors(pids, _GONE_WITHIN_S)
            return
        try:
            self._time_recovery(client, fault, pids, killed_at, timeout)
        finally:
            if fault.hang:  # the server should have killed them; none is left stopped
                self.hung_left_alive += _kill_survivors(pids, _GONE_WITHIN_S)

    def _time_recovery(self, client, fault: Fault, pids, killed_at, timeout) -> None:
        """Waits until the fault's replica serves again without the pids, and records when.
        A failed status call is asked again (the server may be busy recovering); at the
        deadline, the last error is raised, if there was one."""
        deadline, error = killed_at + timeout, None
        while time.monotonic() < deadline:
            try:
                with _phase("wait-recovered", str(fault)):
                    replicas = {r.replica_id: r for r in client.server_info().replicas}
            except ChaosError as e:
                replicas, error = {}, e
                log.warning("%s (asking again)", e)
            replica = replicas.get(fault.target)
            if replica is not None and replica.state == "serving":
                if not {w.pid for w in replica.workers} & set(pids):
                    self.recovery_s[str(fault)] = time.monotonic() - killed_at
                    return
            time.sleep(_POLL_S)
        if error is not None:
            raise error


def _alive(pid: int) -> bool:
    """Whether the process runs or is stopped (not gone, not a zombie awaiting its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_survivors(pids: list[int], within_s: float) -> list[int]:
    """Waits up to within_s for the pids to be gone; SIGKILLs those still alive, returned."""
    deadline = time.monotonic() + within_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return survivors


def _pids(info: serving_pb2.ServerInfoResponse, fault: Fault) -> list[int]:
    if fault.kind == "frontend":
        if fault.target >= len(info.frontends):
            raise ValueError(f"no frontend {fault.target}: the server has {len(info.frontends)}")
        return [info.frontends[fault.target].pid]
    replica = next((r for r in info.replicas if r.replica_id == fault.target), None)
    if replica is None:
        raise ValueError(f"no replica {fault.target} in {[r.replica_id for r in info.replicas]}")
    workers = replica.workers if fault.kind == "replica" else replica.workers[:1]
    return [w.pid for w in workers]


def _settled(client: Client, before: dict[int, int], timeout: float) -> dict[int, int]:
    """Blocks in use once they are back to `before` (or when timeout has passed)."""
    deadline = time.monotonic() + timeout
    while True:
        after = blocks_in_use(_server_info(client, "blocks in use after the chaos run"))
        if after == before or time.monotonic() > deadline:
            return after
        time.sleep(_POLL_S)


def _report(streams, reference, before, after, recovery_s) -> Report:
    lost, mismatched, duplicated, missing = [], [], 0, 0
    for i, (got, want) in enumerate(zip(streams, reference, strict=True)):
        rid = f"chaos-{i}"
        if got.error:
            lost.append(f"{rid}: {got.error}")
            continue
        expected = want[: len(got.tokens)] if got.cancelled else want
        if got.tokens == expected:
            continue
        common = next(
            (k for k, (a, b) in enumerate(zip(got.tokens, expected, strict=False)) if a != b),
            min(len(got.tokens), len(expected)),
        )
        duplicated += max(len(got.tokens) - len(expected), 0)
        missing += max(len(expected) - len(got.tokens), 0)
        mismatched.append(
            f"{rid}: {len(got.tokens)} tokens, {len(expected)} expected, first difference "
            f"at token {common}"
        )
    return Report(
        num_requests=len(streams),
        finished=sum(bool(s.finish_reason) and not s.error for s in streams),
        cancelled=sum(s.cancelled for s in streams),
        lost=lost,
        mismatched=mismatched,
        duplicated_tokens=duplicated,
        missing_tokens=missing,
        blocks_before=before,
        blocks_after=after,
        recovery_s=recovery_s,
        num_recovered_requests=0,
        outputs={f"chaos-{i}": s for i, s in enumerate(streams)},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None, help="start this cluster (else connect)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cancel-fraction", type=float, default=0.0)
    for option, parse, what in (
        ("--kill", _fault_argument, f"SIGKILL; KIND in {KINDS}"),
        ("--hang", _hang_argument, f"SIGSTOP (alive, silent); KIND in {HANG_KINDS}"),
    ):
        parser.add_argument(
            option,
            action="append",
            default=[],
            type=parse,
            metavar="KIND[:TARGET]@WHEN",
            help=f"{what}; WHEN 2.5s (seconds into the run) or 300t (tokens streamed)",
        )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)


def _fault_argument(text: str, hang: bool = False) -> Fault:
    try:
        return Fault.parse(text, hang)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hang_argument(text: str) -> Fault:
    return _fault_argument(text, hang=True)


def prompts_for(vocab_size: int, num: int, length: int, seed: int) -> list[list[int]]:
    """num token-id prompts of `length` tokens, from seed alone."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(num)]


def chaos(client: Client, args: argparse.Namespace) -> Report:
    """The chaos run that the parsed arguments ask for, against client's server."""
    for name in ("num_requests", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.cancel_fraction <= 1:
        raise ValueError(f"--cancel-fraction must be in [0, 1], got {args.cancel_fraction}")
    with _phase("status", "the model's vocabulary"):
        vocab = client.model_info().vocab_size
    prompts = prompts_for(vocab, args.num_requests, args.prompt_len, args.seed)
    return run(
        client,
        prompts,
        args.max_tokens,
        args.kill + args.hang,
        args.cancel_fraction,
        args.seed,
        timeout=args.timeout,
    )
