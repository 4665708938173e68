"""Serving metrics: the metric contract, the gateway's Prometheus sink and dashboard snapshots."""
