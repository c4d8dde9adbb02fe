"""Handing freed heap memory back to the OS in long-lived processes (the coordinator actor, a
driver that built zoo models) that share a node with the pool's engines and trainers."""
from __future__ import annotations

import ctypes
import gc


def release_memory() -> None:
    """Hand freed heap memory back to the OS. Weight-level jobs read whole models in worker
    threads (`asyncio.to_thread`); glibc keeps what those threads freed in per-thread arenas, so
    without a trim the coordinator stayed ~2.4 GB larger after a SmolLM2 weight job, memory the
    pool's engines and trainers on the same node need. No-op off glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
