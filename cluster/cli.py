"""The `pagedserve` command.

pagedserve up -c configs/local.yaml [--set section.key=value ...]   serve until Ctrl-C / down
pagedserve generate "What is the capital of France?" [--stream]
pagedserve status
pagedserve scale --replicas N
pagedserve chaos [-c CONFIG | --address A] --kill worker:1@300t [--cancel-fraction 0.1]
pagedserve down
pagedserve bench latency -c configs/local.yaml [--batch-size 1 8 32] [--output-len 512]
pagedserve bench throughput -c configs/local.yaml [--num-requests 256] [--hf-batch 64]
pagedserve bench serve --address HOST:PORT [--request-rate 2 4 8] [--backend http] [--plot P]
"""

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from cluster import chaos
from cluster.client import Client, Credentials
from cluster.config import ConfigError, load_config
from cluster.outputs import OutputCollector
from scheduler.sampling_params import RequestOutputKind, SamplingParams


def state_file() -> Path:
    """Where `up` records its pid and address for `generate`, `status` and `down`."""
    base = os.environ.get("PAGEDSERVE_STATE_DIR") or Path.home() / ".pagedserve"
    return Path(base) / "cluster.json"


def _read_state() -> dict | None:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None


def _connect(args: argparse.Namespace) -> Client:
    """A client of --address, or of the cluster `up` recorded (TLS verified against the
    server's own certificate, when it is self-signed and no --tls-ca is given)."""
    state = _read_state() or {}
    address = args.address or state.get("address")
    if address is None:
        sys.exit("no running cluster recorded; start one with `pagedserve up` or pass --address")
    ca = args.tls_ca or (state.get("tls_cert_file") if not args.address else None)
    credentials = Credentials(
        token=args.token or os.environ.get("PAGEDSERVE_TOKEN") or None,
        tls_ca_file=ca,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
    )
    return Client(address, credentials)


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.launcher import Cluster

    config = load_config(args.config, args.set)
    stop = threading.Event()
    cluster = Cluster(config, args.config or "<defaults>")
    try:
        address = cluster.start()
        # After start: ray.init installs a SIGTERM handler of its own that exits at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        path = state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "address": address, "http_url": cluster.http_url}
        if config.server.tls_cert_file is not None:
            state["tls_cert_file"] = os.path.abspath(config.server.tls_cert_file)
        path.write_text(json.dumps(state))
        print(
            f"pagedserve is serving {config.model.model} on {address} (gRPC) and "
            f"{cluster.http_url}/v1 (OpenAI-compatible HTTP)",
            flush=True,
        )
        while not stop.wait(timeout=1.0):
            pass
        print("pagedserve: shutting down", flush=True)
    finally:
        cluster.shutdown()
        state = _read_state()
        if state is not None and state.get("pid") == os.getpid():
            state_file().unlink(missing_ok=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        # Printed at the end unless streamed: then one message is all the server need send.
        output_kind=RequestOutputKind.DELTA if args.stream else RequestOutputKind.FINAL_ONLY,
    )
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    with _connect(args) as client:
        collector = OutputCollector()
        for msg in client.generate(prompt, params):
            if args.stream:
                print(msg.text, end="", flush=True)
            collector.add(msg)
        out = collector.result().outputs[0]
        if not args.stream:
            print(out.text, end="")
        print(
            f"\n[finish_reason={out.finish_reason} prompt_tokens={out.usage.prompt_tokens} "
            f"completion_tokens={out.usage.completion_tokens}]"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        info = client.server_info()
        health = client.health()
    steps = info.num_steps
    graphs = f"{info.num_graph_steps / steps:.0%}" if steps else "-"
    pieces = f"{info.num_piecewise_steps / steps:.0%}" if steps else "-"
    mean_ms = f"{info.step_seconds / steps * 1e3:.2f}" if steps else "-"
    print(
        f"model {info.model} ({health}): {steps} steps ({graphs} in whole CUDA graphs, {pieces} "
        f"in pieces, {mean_ms} ms each), {info.num_finished_requests} requests finished, "
        f"{info.num_generated_tokens} tokens generated; "
        f"{info.generated_tokens_per_s:.1f} tokens/s over the last "
        f"{info.throughput_window_s:g} s; {info.num_replica_failures} replica failures, "
        f"{info.num_recovered_requests} requests recomputed elsewhere"
    )
    for n in info.nodes:
        resources = ", ".join(
            f"{k} {v:g}" for k, v in sorted(n.resources.items()) if not k.startswith("node:")
        )
        print(f"node {n.node_id} {n.address} {'alive' if n.alive else 'dead'}: {resources}")
    for f in info.frontends:
        print(
            f"frontend pid {f.pid}: {f.num_requests} requests since it connected, "
            f"{f.num_unfinished} unfinished"
        )
    for r in info.replicas:
        used = r.num_blocks - r.num_free_blocks
        hits = 100 * r.prefix_cache_hits / max(r.prefix_cache_queries, 1)
        print(
            f"replica {r.replica_id} ({r.state}): KV {used}/{r.num_blocks} blocks of "
            f"{r.block_size} ({100 * used / max(r.num_blocks, 1):.1f}%), running "
            f"{r.num_running}, waiting {r.num_waiting}, swapped {r.num_swapped}; "
            f"{r.generated_tokens_per_s:.1f} tokens/s; prefix cache hits {hits:.1f}% of "
            f"{r.prefix_cache_queries} tokens; {r.num_preemptions} preemptions "
            f"({r.num_swapped_out} by swap)"
        )
        if r.last_failure:
            print(f"  last failure: {r.last_failure}")
        for w in r.workers:
            node = f" on node {w.node_id}" if w.node_id else ""
            reduce = f", all-reduce {w.all_reduce}" if w.all_reduce else ""
            print(f"  rank {w.rank}: {w.address} ({w.device}{reduce}) pid {w.pid}{node}")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    """Faults under streaming load (cluster/chaos.py); fails (1) for any of chaos.problems:
    a request lost, a stream unlike the fault-free run, blocks left in use, a replica not
    recovered or one that held no request when it failed, a hung process left alive."""
    if args.config is None:
        with _connect(args) as client:
            report = chaos.chaos(client, args)
    else:
        from cluster.launcher import Cluster

        cluster = Cluster(load_config(args.config, args.set))
        try:
            with Client(cluster.start()) as client:
                report = chaos.chaos(client, args)
        finally:
            cluster.shutdown()
    print("\n".join(report.lines()))
    failed = chaos.problems(report, args.kill + args.hang)
    print("\n".join(f"FAILED: {problem}" for problem in failed))
    return 1 if failed else 0


def cmd_scale(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        reply = client.scale(args.replicas, timeout=args.timeout)
    print(f"serving replicas: {', '.join(map(str, reply.serving))}")
    if reply.added:
        print(f"added: {', '.join(map(str, reply.added))}")
    if reply.draining:
        print(
            f"draining: {', '.join(map(str, reply.draining))} (they finish their "
            f"{reply.num_draining_requests} requests, then stop; see `pagedserve status`)"
        )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state = _read_state()
    if state is None:
        print("no running cluster recorded")
        return 0
    pid = state["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state_file().unlink(missing_ok=True)
        print(f"the cluster's process {pid} was already gone")
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            print(f"pagedserve (pid {pid}) is down")
            return 0
        time.sleep(0.2)
    print(f"pid {pid} did not stop within {args.timeout} s", file=sys.stderr)
    return 1


def _running(pid: int) -> bool:
    """True while pid exists and has not exited (an exited child its parent has not reaped yet
    is a zombie: done)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _add_bench(sub) -> None:
    """`pagedserve bench latency | throughput | serve`: each verb's module has its arguments and
    run."""
    from cluster.benchmarks import latency, serve, throughput

    bench = sub.add_parser(
        "bench",
        help="benchmark: latency or throughput (of a cluster started from a config), or serve "
        "(a running server under load)",
    )
    verbs = bench.add_subparsers(dest="verb", required=True)
    for name, module in (("latency", latency), ("throughput", throughput), ("serve", serve)):
        verb = verbs.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(verb)
        verb.set_defaults(func=module.run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    connect = argparse.ArgumentParser(add_help=False)  # how generate/status/scale connect
    connect.add_argument("--address", default=None, help="host:port (default: the one `up` ran)")
    connect.add_argument("--token", default=None, help="auth token (default: $PAGEDSERVE_TOKEN)")
    connect.add_argument("--tls-ca", default=None, help="PEM roots that sign the server's cert")
    connect.add_argument("--tls-cert", default=None, help="client certificate (mTLS)")
    connect.add_argument("--tls-key", default=None, help="client private key (mTLS)")
    up = sub.add_parser("up", help="start a cluster and serve until Ctrl-C or `down`")
    up.add_argument("-c", "--config", default=None, help="YAML config (default: built-in)")
    up.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    up.set_defaults(func=cmd_up)
    gen = sub.add_parser("generate", help="send one prompt", parents=[connect])
    gen.add_argument("prompt")
    gen.add_argument("--stream", action="store_true", help="print text as it arrives")
    gen.add_argument("--raw", action="store_true", help="send the prompt without chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
    status = sub.add_parser(
        "status",
        help="show nodes, replicas, workers, KV usage, queues and throughput",
        parents=[connect],
    )
    status.set_defaults(func=cmd_status)
    scale = sub.add_parser(
        "scale", help="add replicas, or drain and remove some", parents=[connect]
    )
    scale.add_argument("--replicas", type=int, required=True, help="how many should serve")
    scale.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for new replicas"
    )
    scale.set_defaults(func=cmd_scale)
    chaos_verb = sub.add_parser(
        "chaos",
        help="kill workers, replicas or frontends under streaming load; report what was lost",
        parents=[connect],
    )
    chaos.add_arguments(chaos_verb)
    chaos_verb.set_defaults(func=cmd_chaos)
    down = sub.add_parser("down", help="stop the cluster that `up` started")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(func=cmd_down)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"pagedserve: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"pagedserve: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except chaos.ChaosError as e:  # the chaos tool's own call failed: its phase is named
        print(f"pagedserve: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
