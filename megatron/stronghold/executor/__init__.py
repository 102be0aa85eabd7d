"""StrongHold's executor: host-memory layer store and the streaming schedule."""
from .streaming import StreamingExecutor

__all__ = ["StreamingExecutor"]
