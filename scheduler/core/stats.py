"""Counters of one replica's scheduler, for export (GetServerInfo now, metrics later).

Gauges (KV usage, queue lengths) are read off the page table and the queues when asked; these
are the totals that only the scheduler sees happen.
"""

from dataclasses import dataclass


@dataclass
class SchedulerStats:
    num_preemptions: int = 0  # by recompute or by swap
    num_swapped_out: int = 0  # preemptions by swap
    prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed)
    num_prompt_tokens_computed: int = 0  # prompt tokens prefilled, recomputed ones included
