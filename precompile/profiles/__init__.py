"""Architecture profiles: the typed YAML, the shipped set, the support matrix."""
