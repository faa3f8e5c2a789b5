"""Who a client is: JWT verification into a Principal."""
