"""Presence (spec section 11): who is subscribed to a channel, on every gateway process."""
