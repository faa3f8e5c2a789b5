"""What the gateway tells about itself: traffic events, metrics, logs, the audit log."""
