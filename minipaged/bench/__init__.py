"""Benchmarks behind ``minipaged bench``: the kernels against the GPU's own copy bandwidth and
against what a user would pick instead, and the block manager's speed on the CPU.

- ``gpu.py``: timing with CUDA events (median after warm-up), the device-to-device copy
  bandwidth that every figure is compared with, paged attention, copy-blocks and
  reshape-and-cache, and PyTorch's ``scaled_dot_product_attention`` where torch is installed.
- ``block_manager.py``: operations per second of ``BlockManager`` on a decode-heavy trace.
- ``cli.py``: the ``minipaged bench`` command.
"""
