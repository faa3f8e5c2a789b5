"""Development helpers: self-signed certificates and test tokens."""
