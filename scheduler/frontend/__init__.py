"""The frontends: what serves clients (Serving gRPC, OpenAI-compatible HTTP, metrics) in front of
the engine core. Several frontend processes share the server's ports; each validates, tokenizes,
detokenizes, matches stop strings and streams; the core sees token ids only."""
