"""Traffic anomaly detection (isolation forest); see issue 5."""
