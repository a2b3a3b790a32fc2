"""lightfn.loggers (being written)."""
__all__: list[str] = []
