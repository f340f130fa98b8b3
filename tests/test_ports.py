"""shared.kafka.free_port hands out ports that nothing else on the machine is given meanwhile.

CI's scale-out rehearsal picked its replicas' ports up front and started the replicas one at a
time; a port the kernel had given out by bind(0) came from the ephemeral range, so an outgoing
connection (a Kafka client's, an engine's ZMQ socket) took it first and the replica died with
"address already in use". Ports below that range are only ever taken by explicit binds."""

from __future__ import annotations

import socket
from contextlib import closing
from pathlib import Path

from shared.kafka import free_port


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_free_ports_lie_below_the_ephemeral_range_and_bind():
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= port < low for port in ports), ports
    assert len(set(ports)) == len(ports), "one process was handed the same port twice"
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_not_handed_out():
    low, _ = ephemeral_range()
    held = []
    try:
        for port in range(low - 200, low):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
                held.append(s)
            except OSError:
                s.close()
        taken = {s.getsockname()[1] for s in held}
        assert not {free_port() for _ in range(50)} & taken
    finally:
        for s in held:
            s.close()
