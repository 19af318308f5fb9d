"""torch's intra-op threads in a worker process that runs the model on the CPU.

Ray sets OMP_NUM_THREADS in each worker process, when it is not set already, to the CPUs its
actor reserved (at least 1); a CPU worker reserves a sliver of one (cluster.placement), so torch
would compute on a single thread. Instead a CPU worker uses the cores this process may run on,
divided among the CPU ranks that share the node (cluster.placement counts them: a
tensor-parallel replica of 2 on 2 cores, 1 thread each; two replicas of one rank on 2 cores,
1 thread each, where 2 each would contend for the cores: BENCHMARKS.md "CPU workers'
threads"), unless OMP_NUM_THREADS was set when the process started (by the user,
in the environment of the node's Ray, or through a runtime_env): then torch keeps that.
"""

import os

import torch


def env_at_start(name: str) -> str | None:
    """The variable as the process was started with it (/proc/self/environ, which later changes
    to os.environ do not touch, as Ray's OMP_NUM_THREADS); os.environ's value without /proc."""
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return os.environ.get(name)
    prefix = name.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads(cores: int, ranks_on_node: int) -> int:
    """The node's cores shared evenly by the CPU ranks there, at least 1 each."""
    return max(1, cores // max(ranks_on_node, 1))


def configure_cpu_threads(ranks_on_node: int) -> int:
    """Sets torch's intra-op threads for a CPU rank (see the module docstring); returns them."""
    if env_at_start("OMP_NUM_THREADS"):  # torch read it when it loaded
        return torch.get_num_threads()
    threads = cpu_threads(available_cores(), ranks_on_node)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for what this process starts
    return threads
