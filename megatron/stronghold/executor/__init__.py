"""StrongHold's executor: host-memory layer store and the streaming schedule."""
from .streaming import StreamingExecutor, owned_by_this_rank

__all__ = ["StreamingExecutor", "owned_by_this_rank"]
