"""Evaluations of the anomaly detector: offline (synthetic traffic, no network) and live."""
