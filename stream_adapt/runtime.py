"""Process-wide settings for a long-running service, applied once at the edge (CLI, benchmarks).

- torch intra-op threads: one by default. The adaptation batches are small; on a shared host extra
  threads spin against other processes and made the same call 1-30x slower in our measurements.
- garbage collector: after imports and model loading, `gc.freeze()` moves every object alive then
  (torch's and the model's: hundreds of thousands) out of the collector's scans. Measured on the
  offline pipeline: ~1.7x events/s.
"""

from __future__ import annotations

import gc

import torch


def tune(threads: int = 1) -> None:
    """Apply the service's process settings; call after the model is loaded."""
    if threads > 0:
        torch.set_num_threads(threads)
    gc.collect()
    gc.freeze()
