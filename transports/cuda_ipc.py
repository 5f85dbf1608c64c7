"""Same-node GPU memory through CUDA IPC handles (NVLink or PCIe peer copies).

Registering a CUDA buffer takes ``cudaIpcGetMemHandle`` of the allocation that
holds it; the descriptor carries (handle, offset into the allocation) per region
and the address of a small control socket. ``connect`` opens each handle once
(``cudaIpcOpenMemHandle``), so a write is one ``cudaMemcpyAsync`` per segment on
this transport's stream, an event, and an async wait on ``cudaEventQuery`` with
a sleep ladder. The notification then goes over the control socket, so the
target sees it only after the event completed.

CUDA reports errors per stream, not per copy: a failed post reports **every**
segment failed. A dead target shows as a broken control socket (``PeerLost``).
Needs torch with CUDA and ``cuda-python`` (``cuda.bindings``); ``is_available()``
is False elsewhere.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Any

from .base import MemoryRegion, Peer, Transport
from .descriptor import decode_descriptor, encode_descriptor
from .errors import (
    ConnectError,
    DescriptorError,
    PeerLost,
    RegistrationError,
    TransferError,
    TransportUnavailable,
)
from .notifications import Notification
from .segments import LOCAL_OFFSET, LOCAL_REGION, NBYTES, REMOTE_OFFSET, REMOTE_REGION, SegmentPairs
from .transfer import Transfer, TransferStatus

logger = logging.getLogger(__name__)
_FRAME = struct.Struct("!II")  # sender name length, payload length


def _cudart() -> Any:
    from cuda.bindings import runtime  # type: ignore[import-not-found]

    return runtime


def _check(result: Any, what: str) -> Any:
    err, *rest = result
    if int(err) != 0:
        raise TransferError(f"{what} failed: CUDA error {int(err)}")
    return rest[0] if len(rest) == 1 else rest


class CudaIpcTransfer(Transfer):
    """Copies queued on the transport's stream and an event after them; polled with ``cudaEventQuery``."""

    poll_interval = 1e-3  # the sleep ladder of ``wait`` tops out here

    def __init__(self, pairs: SegmentPairs, event: Any, notify: Any, timeout: float) -> None:
        super().__init__(len(pairs), pairs.nbytes, timeout=timeout, label="CUDA IPC copy")
        self._event, self._notify = event, notify

    def _check(self) -> None:
        err = int(_cudart().cudaEventQuery(self._event)[0])
        if err == int(_cudart().cudaError_t.cudaErrorNotReady):
            return
        if err != 0:
            self.settle(TransferStatus.FAILED, TransferError, f"CUDA copy failed: error {err}")
            return
        try:
            self._notify()
        except OSError as exc:
            self.settle(TransferStatus.FAILED, PeerLost, f"control socket to the target broke: {exc}")
            return
        self.settle(TransferStatus.DONE)

    # abort and timeouts settle the report only: copies already queued on the stream cannot be recalled


class CudaIpcTransport(Transport):
    """CUDA IPC endpoint. Options: ``device`` (CUDA ordinal, default 0), ``timeout``."""

    kind = "cuda_ipc"
    devices = ("cuda",)

    @classmethod
    def is_available(cls) -> bool:
        try:
            import torch

            _cudart()
        except ImportError:
            return False
        return bool(torch.cuda.is_available())

    def __init__(self, name: str | None = None, *, device: int = 0, timeout: float = 60.0) -> None:
        super().__init__(name)
        if not self.is_available():
            raise TransportUnavailable("cuda_ipc needs torch with CUDA, a GPU and cuda-python")
        import torch

        self.device, self.timeout = device, timeout
        torch.cuda.set_device(device)
        self._stream = _check(_cudart().cudaStreamCreate(), "cudaStreamCreate")
        self._handles: dict[int, tuple[bytes, int]] = {}  # region -> (IPC handle, offset in allocation)
        self._opened: list[int] = []  # remote allocations mapped here
        self._server = socket.create_server(("127.0.0.1", 0))
        self._conns: dict[str, socket.socket] = {}  # ours, to peers' control sockets
        self._accepted: list[socket.socket] = []  # peers' connections to ours
        self._accept = threading.Thread(target=self._serve, name=f"pdx-cuda-ipc-{self.name}", daemon=True)
        self._accept.start()

    def allocate(self, nbytes: int, device: str = "cuda") -> MemoryRegion:
        import torch

        return self.register(torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{self.device}"))

    def _register(self, region: MemoryRegion) -> None:
        from cuda.bindings import driver  # type: ignore[import-not-found]

        try:
            handle = _check(_cudart().cudaIpcGetMemHandle(region.addr), "cudaIpcGetMemHandle")
            base, _size = _check(driver.cuMemGetAddressRange(region.addr), "cuMemGetAddressRange")
        except TransferError as exc:
            raise RegistrationError(f"cannot export CUDA memory for IPC: {exc}") from exc
        self._handles[region.region_id] = (bytes(handle.reserved), region.addr - int(base))

    def _deregister(self, region: MemoryRegion) -> None:
        self._handles.pop(region.region_id, None)
        super()._deregister(region)

    def descriptor(self) -> bytes:
        self._check_open()
        ipc = {str(rid): [h.hex(), off] for rid, (h, off) in self._handles.items()}
        return encode_descriptor(self, {"port": self._server.getsockname()[1], "ipc": ipc})

    async def connect(self, descriptor: bytes) -> Peer:
        self._check_open()
        desc = decode_descriptor(descriptor, self.kind)
        ipc, port = desc.address.get("ipc"), desc.address.get("port")
        if not isinstance(ipc, dict) or not isinstance(port, int):
            raise DescriptorError(f"cuda_ipc descriptor of {desc.name} lacks IPC handles or a port")
        rt = _cudart()
        ptrs: dict[int, int] = {}
        for rid in desc.regions:
            hexhandle, offset = ipc.get(str(rid), (None, 0))
            if not isinstance(hexhandle, str) or not isinstance(offset, int):
                raise DescriptorError(f"cuda_ipc descriptor of {desc.name}: no IPC handle for region {rid}")
            handle = rt.cudaIpcMemHandle_t()
            handle.reserved = bytes.fromhex(hexhandle)
            err, base = rt.cudaIpcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess)
            if int(err) != 0:
                raise ConnectError(f"cannot open the CUDA IPC handle of {desc.name} region {rid} "
                                   f"(stale descriptor or another node): error {int(err)}")
            self._opened.append(int(base))
            ptrs[rid] = int(base) + offset
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError as exc:
            raise ConnectError(f"cannot reach the cuda_ipc control socket of {desc.name}: {exc}") from exc
        old = self._conns.pop(desc.name, None)
        if old is not None:
            old.close()
        self._conns[desc.name] = conn
        peer = Peer(desc.name, desc.regions, state=ptrs)
        return peer

    async def post_write(self, peer: Peer, pairs: SegmentPairs, notif: bytes | None = None) -> Transfer:
        self._validate(peer, pairs)
        rt = _cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for row in pairs.table.tolist():
            src = self.regions[row[LOCAL_REGION]].addr + row[LOCAL_OFFSET]
            dst = peer.state[row[REMOTE_REGION]] + row[REMOTE_OFFSET]
            _check(rt.cudaMemcpyAsync(dst, src, row[NBYTES], kind, self._stream), "cudaMemcpyAsync")
        event = _check(rt.cudaEventCreate(), "cudaEventCreate")
        _check(rt.cudaEventRecord(event, self._stream), "cudaEventRecord")
        conn = self._conns[peer.name]

        def notify() -> None:
            if notif is not None:
                name = self.name.encode()
                conn.sendall(_FRAME.pack(len(name), len(notif)) + name + notif)

        return CudaIpcTransfer(pairs, event, notify, self.timeout)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._accepted.append(conn)
            threading.Thread(target=self._read_notifs, args=(conn,), daemon=True).start()

    def _read_notifs(self, conn: socket.socket) -> None:
        with conn:
            while True:
                head = _recv_exact(conn, _FRAME.size)
                if head is None:
                    return
                name_len, payload_len = _FRAME.unpack(head)
                body = _recv_exact(conn, name_len + payload_len)
                if body is None:
                    return
                self.notifications.push(Notification(body[:name_len].decode(), body[name_len:]))

    async def aclose(self) -> None:
        if self._closed:
            return
        await super().aclose()
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocking accept()
        except OSError:
            pass
        self._server.close()
        for conn in [*self._conns.values(), *self._accepted]:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._accept.join(5)
        rt = _cudart()
        for base in self._opened:
            rt.cudaIpcCloseMemHandle(base)
        rt.cudaStreamDestroy(self._stream)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
