"""The engine core: requests, the router, each replica's PageTableManager and Scheduler, the step
loop that drives the workers, and the EngineCore service the frontends stream token ids through.
It never tokenizes, detokenizes or holds a client connection."""
