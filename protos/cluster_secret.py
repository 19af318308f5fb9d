"""The cluster secret: how the engine core proves itself to its workers (worker.proto).

`pagedserve up` draws one random secret per cluster and hands it to the engine core and to every
worker it places through Ray (actor arguments): never in the YAML, never on disk. Every call to
a worker carries it as the metadata METADATA_KEY; a worker refuses a call without it, or with
another one, UNAUTHENTICATED before any handler runs.
"""

METADATA_KEY = "pagedserve-cluster-secret"
