"""What a principal may do: YAML policy rules and their conditions."""
