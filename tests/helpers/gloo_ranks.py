"""Multi-process tests on a CPU: gloo process groups on localhost.

    free_port()                          a free TCP port on 127.0.0.1
    spawn_ranks(fn, world, *args)        runs fn(rank, world, port, *args) in `world` processes (joined)
    gloo_group(rank, world, port)        context manager: the process group for one of those ranks

`fn` must be a module-level function of a test module (the processes are spawned, not forked).
"""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
