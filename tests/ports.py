"""Free local ports for the servers the tests start (Prefect, SeaweedFS)."""

from __future__ import annotations

import random
import socket


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_block(n: int, lo: int = 20000, hi: int = 40000, also: tuple[int, ...] = ()) -> int:
    """A base port with base … base+n-1 (and base+each of `also`) free."""
    for _ in range(200):
        base = random.randrange(lo, hi - n)
        if all(port_free(base + i) for i in (*range(n), *also)):
            return base
    raise RuntimeError("no free port block")
