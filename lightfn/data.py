"""lightfn.data (being written)."""
