"""The operator side: admin/metrics/SSE listener, health and readiness, process tuning."""
