"""How much a client may do: token buckets, rate limits, connection caps, bans."""
