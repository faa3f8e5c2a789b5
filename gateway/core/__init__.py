"""The connection model shared by every transport: node, sessions, hub, deadlines, reloads."""
