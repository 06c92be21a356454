"""Exporters: the metric catalogue (``catalogue``), Prometheus (``prometheus.AgentCollector``) and
OpenTelemetry/OTLP (``otlp.OtlpExporter``). Trace recording is ``phaselens record`` (agent/commands.py),
which writes the same JSON Lines records the agent receives and samples."""
