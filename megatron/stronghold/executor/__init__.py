"""StrongHold's executor: host-memory layer store and the streaming schedule."""
from .ownership import owned_by_this_rank
from .streaming import StreamingExecutor

__all__ = ["StreamingExecutor", "owned_by_this_rank"]
