"""The bundled serving engine: model, KV cache, scheduler, workers, HTTP API, router, split-pool mode."""
