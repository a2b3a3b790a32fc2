"""lightfn.distributed (being written)."""
__all__: list[str] = []
