"""StrongHold native extensions.

C++ kernels live here, each with a pure-torch fallback used when the
extension is not built. A kernel is added only when it beats the library
(torch / DeepSpeed / megatron-core) implementation it replaces.
"""
