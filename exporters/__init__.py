"""Exporters: Prometheus, OpenTelemetry (OTLP), trace recorder."""
