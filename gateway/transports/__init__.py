"""Ways in: wire format and I/O of each transport (WebSocket send path, SSE, HTTP listener)."""
