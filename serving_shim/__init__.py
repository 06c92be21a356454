"""The phase emitter that runs inside the engine, and adapters for other engines' step streams."""
