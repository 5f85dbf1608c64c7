"""Raw baselines for ``pdx bench transport``: what each medium does without pdx.

Each ``*_baseline(points, posts)`` runs, for every ``(seg, order)`` point,
``posts`` batches (after one warm-up) of ``len(order)`` segments of ``seg`` bytes,
source segment ``i`` landing in destination slot ``order[i]`` (the same scattered
layout pdx is given), and returns per-post seconds per point. Receivers run in
one spawned process per transport, like pdx's targets.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket
import time
from typing import Any

import numpy as np

BASELINE_NAMES = {
    "loopback": "numpy memcpy",
    "shm": "memcpy into /dev/shm",
    "tcp": "raw blocking sockets",
    "nixl": "bare NIXL agent",
    "ucx": "bare ucxx send/recv",
}


def _copy_posts(dst: np.ndarray, src: np.ndarray, seg: int, order: np.ndarray, posts: int) -> list[float]:
    lat = []
    for _ in range(posts + 1):  # the first post warms up
        t0 = time.perf_counter()
        for i, slot in enumerate(order.tolist()):
            np.copyto(dst[slot * seg : (slot + 1) * seg], src[i * seg : (i + 1) * seg])
        lat.append(time.perf_counter() - t0)
    return lat[1:]


Points = list[tuple[int, np.ndarray]]


def _nbytes(points: Points) -> int:
    return max(seg * len(order) for seg, order in points)


def loopback_baseline(points: Points, posts: int) -> list[list[float]]:
    n = _nbytes(points)
    src, dst = np.ones(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8)
    return [_copy_posts(dst, src, seg, order, posts) for seg, order in points]


def shm_baseline(points: Points, posts: int) -> list[list[float]]:
    from multiprocessing import shared_memory

    n = _nbytes(points)
    shm = shared_memory.SharedMemory(create=True, size=n)
    try:
        dst = np.ndarray((n,), dtype=np.uint8, buffer=shm.buf)
        dst[:] = 0  # pre-touch, as pdx's shm regions are
        src = np.ones(n, dtype=np.uint8)
        lat = [_copy_posts(dst, src, seg, order, posts) for seg, order in points]
        del dst
    finally:
        shm.close()
        shm.unlink()
    return lat


# -- tcp ------------------------------------------------------------------------------
def _tcp_receiver(port_conn: Any, points: Points, posts: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port_conn.send(srv.getsockname()[1])
    sock, _ = srv.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = np.zeros(_nbytes(points), dtype=np.uint8).data
    for seg, order in points:
        for _ in range(posts + 1):
            for slot in order.tolist():
                part = view[slot * seg : (slot + 1) * seg]
                got = 0
                while got < seg:
                    got += sock.recv_into(part[got:])
            sock.sendall(b"k")
    sock.close()
    srv.close()


def tcp_baseline(points: Points, posts: int) -> list[list[float]]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_tcp_receiver, args=(b, points, posts), daemon=True)
    proc.start()
    port = a.recv()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    src = np.ones(_nbytes(points), dtype=np.uint8).data
    out = []
    for seg, order in points:
        lat = []
        for _ in range(posts + 1):
            t0 = time.perf_counter()
            for i in range(len(order)):
                sock.sendall(src[i * seg : (i + 1) * seg])
            sock.recv(1)
            lat.append(time.perf_counter() - t0)
        out.append(lat[1:])
    sock.close()
    proc.join(10)
    return out


# -- nixl -----------------------------------------------------------------------------
def _nixl_target(conn: Any, nbytes: int) -> None:
    from pdx.transports.nixl import import_nixl

    api = import_nixl()
    agent = api.nixl_agent("bench-target", api.nixl_agent_config(backends=["UCX"], enable_prog_thread=False))
    buf = np.zeros(nbytes, dtype=np.uint8)
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    while not conn.poll(0.001):  # without a progress thread, UCX moves only when called
        agent.get_new_notifs()
    conn.recv()


def nixl_baseline(points: Points, posts: int) -> list[list[float]]:
    from pdx.transports.nixl import import_nixl

    api = import_nixl()
    n = _nbytes(points)
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_nixl_target, args=(b, n), daemon=True)
    proc.start()
    meta, raddr = a.recv()
    # no progress thread, as pdx runs it: NIXL's spins a core per agent, which on a small box
    # starves the copy (the busy poll below drives progress instead)
    agent = api.nixl_agent("bench-initiator", api.nixl_agent_config(backends=["UCX"], enable_prog_thread=False))
    src = np.ones(n, dtype=np.uint8)
    agent.register_memory([(src.ctypes.data, n, 0, "")], "DRAM")
    remote = agent.add_remote_agent(meta)
    out = []
    for seg, order in points:
        idx = np.arange(len(order), dtype=np.uint64)
        useg = np.full_like(idx, seg)
        ldesc = np.stack([src.ctypes.data + idx * useg, useg, np.zeros_like(idx)], axis=1)
        rdesc = np.stack([raddr + order.astype(np.uint64) * useg, useg, np.zeros_like(idx)], axis=1)
        lat = []
        for _ in range(posts + 1):
            t0 = time.perf_counter()  # descriptor lists built per post, as a caller with fresh blocks would
            handle = agent.initialize_xfer(
                "WRITE", agent.get_xfer_descs(ldesc, "DRAM"), agent.get_xfer_descs(rdesc, "DRAM"), remote, b""
            )
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            handle.release()
            lat.append(time.perf_counter() - t0)
            if state != "DONE":
                raise RuntimeError(f"bare NIXL write failed: {state}")
        out.append(lat[1:])
    a.send("stop")
    proc.join(10)
    agent.remove_remote_agent(remote)
    return out


# -- ucx ------------------------------------------------------------------------------
def _ucx_receiver(conn: Any, points: Points, posts: int) -> None:
    import ucxx

    async def main() -> None:
        done = asyncio.Event()
        buf = np.zeros(_nbytes(points), dtype=np.uint8)

        async def handler(ep: Any) -> None:
            for seg, order in points:
                views = [buf[s * seg : (s + 1) * seg] for s in order.tolist()]
                for _ in range(posts + 1):
                    for v in views:
                        await ep.recv(v)
                    await ep.send(np.ones(1, dtype=np.uint8))
            done.set()

        listener = ucxx.create_listener(handler, 0)
        conn.send(listener.port)
        await done.wait()
        await asyncio.sleep(0.1)
        listener.close()

    asyncio.run(main())


def ucx_baseline(points: Points, posts: int) -> list[list[float]]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_ucx_receiver, args=(b, points, posts), daemon=True)
    proc.start()
    port = a.recv()

    async def main() -> list[list[float]]:
        import ucxx

        ep = await ucxx.create_endpoint("127.0.0.1", port)
        src = np.ones(_nbytes(points), dtype=np.uint8)
        ack = np.zeros(1, dtype=np.uint8)
        out = []
        for seg, order in points:
            parts = [src[i * seg : (i + 1) * seg] for i in range(len(order))]
            lat = []
            for _ in range(posts + 1):
                t0 = time.perf_counter()
                for p in parts:
                    await ep.send(p)
                await ep.recv(ack)
                lat.append(time.perf_counter() - t0)
            out.append(lat[1:])
        await ep.close()
        return out

    # ucxx binds to one loop per process; pdx's ucx transport owns a private loop thread,
    # so the bare baseline runs on one of its own.
    from pdx.transports._ucx_runtime import UcxRuntime

    runtime = UcxRuntime.acquire()  # once per process: kept until exit, like the transport's
    lat = runtime.submit(main()).result(600)
    proc.join(10)
    return lat


BASELINES = {
    "loopback": loopback_baseline,
    "shm": shm_baseline,
    "tcp": tcp_baseline,
    "nixl": nixl_baseline,
    "ucx": ucx_baseline,
}
