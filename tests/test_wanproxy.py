"""The benchmark WAN emulator delays and paces traffic, and refuses non-loopback addresses.

Only lower bounds are asserted: the proxy can never be faster than the link it emulates, so
these checks do not depend on how loaded the machine is.
"""

from __future__ import annotations

import math

import pytest
import trio

from benchmarks.wanproxy import WanProxy


async def _echo_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _round_trip(rtt_s: float, bits: float, payload: bytes) -> tuple[float, bytes]:
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(_echo_server)
        proxy = WanProxy("127.0.0.1", echo_port, rtt_s=rtt_s, bits_per_second=bits)
        port = await nursery.start(proxy.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = trio.current_time()
        got = bytearray()
        async with stream:

            async def sender() -> None:
                await stream.send_all(payload)

            nursery.start_soon(sender)
            while len(got) < len(payload):
                got += await stream.receive_some(65536)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return elapsed, bytes(got)


def test_round_trip_takes_at_least_the_rtt() -> None:
    elapsed, got = trio.run(_round_trip, 0.2, math.inf, b"ping")
    assert got == b"ping"
    assert elapsed >= 0.2


def test_bandwidth_is_capped() -> None:
    payload = bytes(range(256)) * 1000  # 256,000 bytes each way over a 4 Mbit/s link
    elapsed, got = trio.run(_round_trip, 0.0, 4e6, payload)
    assert got == payload
    assert elapsed >= len(payload) * 8 / 4e6  # 0.512 s


def test_only_loopback_addresses() -> None:
    with pytest.raises(ValueError, match="loopback"):
        WanProxy("10.0.0.1", 80)
