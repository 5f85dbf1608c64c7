"""The one ``Transfer`` base: settled once, the report's error class raised, waits that never hang."""

from __future__ import annotations

import asyncio
import threading

import pytest
from pdx.transports.errors import PeerLost, TransferAborted, TransferError, TransferTimeout
from pdx.transports.transfer import ThreadTransfer, Transfer, TransferStatus


class _Stoppable(Transfer):
    def __init__(self) -> None:
        super().__init__(3, 300, timeout=0.05, label="test transfer")
        self.stops = 0

    def _stop(self) -> None:
        self.stops += 1


def test_settled_once_and_the_first_outcome_wins():
    t = Transfer(2, 20)
    assert t.poll() is TransferStatus.PENDING
    assert t.settle(TransferStatus.FAILED, PeerLost, "gone", [1])
    assert not t.settle(TransferStatus.DONE)
    assert t.poll() is TransferStatus.FAILED
    with pytest.raises(PeerLost, match="gone") as err:
        asyncio.run(t.wait())
    assert err.value.report is t.report and err.value.report.failed_segments == (1,)


def test_timeout_aborts_once_and_stops_the_io():
    t = _Stoppable()
    with pytest.raises(TransferTimeout, match="test transfer did not complete within 0.05s") as err:
        asyncio.run(t.wait())
    assert err.value.report.status is TransferStatus.ABORTED
    assert err.value.report.failed_segments == (0, 1, 2)
    t.abort()  # already settled: nothing more to stop
    with pytest.raises(TransferTimeout):
        t.wait_blocking(1)
    assert t.stops == 1


def test_abort_wakes_a_blocking_waiter_in_another_thread():
    t = _Stoppable()
    out: list[BaseException] = []

    def waiter() -> None:
        try:
            t.wait_blocking(10)
        except TransferError as exc:
            out.append(exc)

    th = threading.Thread(target=waiter)
    th.start()
    t.abort()
    th.join(10)
    assert len(out) == 1 and isinstance(out[0], TransferAborted) and t.stops == 1


def test_polled_transfer_settles_from_its_check():
    class Polled(Transfer):
        poll_interval = 1e-3

        def __init__(self) -> None:
            super().__init__(1, 8)
            self.checks = 0

        def _check(self) -> None:
            self.checks += 1
            if self.checks == 5:
                self.settle(TransferStatus.DONE)

    t = Polled()
    assert asyncio.run(t.wait(5)).ok and t.checks == 5
    assert Polled().wait_blocking(5).ok


def test_thread_transfer_runs_on_done_once_after_every_part_and_reports_rejected_rows():
    done: list[int] = []
    t = ThreadTransfer(1, 4, 40, num_parts=2, on_done=lambda tr: done.append(tr.transfer_id))

    async def go() -> TransferError:
        waiting = asyncio.ensure_future(t.wait(10))
        await asyncio.sleep(0)
        threading.Thread(target=t.part_done, args=([3], "region released")).start()
        await asyncio.sleep(0.01)
        assert not waiting.done() and not done
        threading.Thread(target=t.part_done).start()
        with pytest.raises(TransferError) as err:
            await waiting
        return err.value

    err = asyncio.run(go())
    assert type(err) is TransferError and err.report.failed_segments == (3,)
    assert "1 of 4 segments failed at the target: region released" in str(err)
    assert done == [1]
