"""Grafana dashboards: grafanalib ``*.dashboard.py`` sources and their generated JSON."""
