"""Real torch.distributed worlds for the tests: N spawned processes on localhost over gloo.

A test calls :func:`spawn_world` with a worker function defined in a module of its own (spawn
imports it by name); the worker calls :func:`join_world` first and saves what it saw to
``out_dir/rank{r}.pt``, which :func:`spawn_world` reads back (``weights_only=True``).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def join_world(rank: int, world_size: int, init_file: str) -> None:
    """Join the gloo group of a spawned world: loopback only, one thread per rank (the ranks share
    the machine's cores), a timeout so that a lost rank fails the test instead of hanging it."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )


def spawn_world(worker, world_size: int, out_dir: Path, *args, timeout_s: float) -> list:
    """Run ``worker(rank, world_size, init_file, out_dir, *args)`` in ``world_size`` processes and
    return what each rank saved, in rank order; a rank that fails or hangs fails the test."""
    out_dir = Path(out_dir)
    context = mp.start_processes(
        worker,
        args=(world_size, str(out_dir / "init"), str(out_dir), *args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} gloo processes did not finish within {timeout_s} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
