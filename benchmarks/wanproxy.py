"""A delay-line TCP proxy that emulates a WAN link in front of a loopback registry.

Each direction of every connection is delayed by half the round-trip time, and all connections
share one bandwidth budget per direction (a link, not a per-connection cap). The kernel here has
no netem qdisc, so latency has to be added in user space. Loopback addresses only.

    python -m benchmarks.wanproxy --upstream 127.0.0.1:5000 --rtt-ms 20 --mbit 150
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import sys
from dataclasses import dataclass, field

import trio

_PIECE = 16 * 1024
_QUEUE_PIECES = 64
_CREDIT_S = 0.005  # bounded per-direction buffer (1 MiB): TCP flow control still works


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address; the proxy only serves loopback")
    return host


@dataclass
class Link:
    """One direction of the emulated link: serialises bytes at *bits_per_second*."""

    bits_per_second: float
    _next_free: float = field(default=0.0)
    bytes_total: int = 0

    async def transmit(self, nbytes: int) -> None:
        self.bytes_total += nbytes
        if math.isinf(self.bits_per_second):
            return
        # A few ms of credit: the sleep below oversleeps under load, and restarting the
        # schedule from "now" every time would never make that lost time up.
        now = trio.current_time()
        start = max(now - _CREDIT_S, self._next_free)
        self._next_free = start + nbytes * 8 / self.bits_per_second
        await trio.sleep_until(self._next_free)


@dataclass
class WanProxy:
    upstream_host: str
    upstream_port: int
    rtt_s: float = 0.020
    bits_per_second: float = 150e6
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    down: Link = field(init=False)
    up: Link = field(init=False)
    connections: int = 0

    def __post_init__(self) -> None:
        self.upstream_host = _loopback(self.upstream_host)
        self.listen_host = _loopback(self.listen_host)
        self.down = Link(self.bits_per_second)
        self.up = Link(self.bits_per_second)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, link: Link) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](_QUEUE_PIECES)
        delay = self.rtt_s / 2

        async def reader() -> None:
            async with send:
                try:
                    while True:
                        data = await src.receive_some(_PIECE)
                        if not data:
                            break
                        await send.send((trio.current_time() + delay, data))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

        async def writer() -> None:
            async with recv:
                try:
                    async for due, data in recv:
                        await trio.sleep_until(due)
                        await link.transmit(len(data))
                        await dst.send_all(data)
                    await dst.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            upstream = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, self.up)
            nursery.start_soon(self._pump, upstream, client, self.down)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.listen_port, host=self.listen_host)
        port = listeners[0].socket.getsockname()[1]
        task_status.started(port)
        await trio.serve_listeners(self._handle, listeners)


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the registry")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=150.0, help="0 for unlimited")
    args = parser.parse_args(argv)
    up_host, up_port = _hostport(args.upstream)
    l_host, l_port = _hostport(args.listen)
    proxy = WanProxy(
        up_host,
        up_port,
        rtt_s=args.rtt_ms / 1000,
        bits_per_second=args.mbit * 1e6 if args.mbit > 0 else math.inf,
        listen_host=l_host,
        listen_port=l_port,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            print(f"{proxy.listen_host}:{port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
