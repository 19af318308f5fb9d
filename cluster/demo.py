"""`make demo`: a real local cluster answers the seed's three prompts through the gRPC client."""

import argparse
import sys
import time

from cluster.client import Client
from cluster.config import load_config
from cluster.launcher import Cluster
from scheduler.sampling_params import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "What is the highest mountain in the world?",
    "What is the meaning of life?",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", default="configs/local.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    config = load_config(args.config, [*args.set, "server.port=0", "server.http_port=0"])
    cluster = Cluster(config)
    start = time.monotonic()
    try:
        address = cluster.start()
        print(f"cluster up in {time.monotonic() - start:.1f} s; serving on {address}\n")
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        with Client(address) as client:
            streams = [client.generate([{"role": "user", "content": p}], params) for p in PROMPTS]
            for prompt, stream in zip(PROMPTS, streams, strict=True):
                answer = "".join(delta.text for delta in stream)
                print(f"Q: {prompt}\nA: {answer.strip()}\n")
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
