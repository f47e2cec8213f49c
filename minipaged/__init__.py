"""minipaged: GPU memory fragmentation management as vLLM does it for the KV cache, small enough to
read in an afternoon.

Modules, one idea each:
- ``minipaged.alloc``: allocators over an arena (buddy, paged, first/best fit);
- ``minipaged.metrics``: internal and external fragmentation, Linux's fragmentation indices;
- ``minipaged.block_manager``: vLLM-style block tables, copy-on-write, prefix caching, swapping;
- ``minipaged.kernels``: Numba CUDA kernels for the paged KV cache, each beside a numpy reference;
- ``minipaged.sim``: a serving simulator that shows where KV memory goes.
"""

__version__ = "0.1.0"
