"""smoltcp's TAP offloads (checksums and TCP segmentation left to the kernel)
over real TAP devices and namespaces: every byte arrives, super-frames are
really used, and a frame with a bad checksum is dropped whichever side
checks it (the device on an offload TAP, smoltcp without)."""

import hashlib
import random
import socket
import struct

import pytest

import dmm.socket as dsocket

from test_smoltcp import lan_peer

pytestmark = pytest.mark.needs_root("TAP devices and network namespaces")

SIZE = 24 * 2**20

#: Receives everything, answers with its sha256.
SINK = r"""
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
h = hashlib.sha256()
while b := conn.recv(1 << 20):
    h.update(b)
conn.sendall(h.hexdigest().encode())
conn.close()
"""

#: Sends SIZE pseudo-random bytes from a seed, then closes.
SOURCE = r"""
import random, socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.sendall(random.Random(int(sys.argv[2])).randbytes(int(sys.argv[3])))
conn.close()
"""

#: Sends one Ethernet frame (hex) out of a device with a packet socket.
INJECT = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""


@pytest.fixture(params=[True, False], ids=["offload", "no-offload"])
def lan(request):
    """A smoltcp instance ``lan0`` with offloads on or off, its TAP's host
    side in a namespace."""
    with lan_peer("dmmo", f"offload = {str(request.param).lower()}") as peer:
        peer.offload = request.param
        yield peer


def stack_counters():
    return dsocket.stack_counters()["lan0"]


def test_bulk_both_ways_keeps_every_byte_and_uses_super_frames_only_with_offload(lan):
    data = random.Random(1).randbytes(SIZE)
    with lan.serve(SINK) as (_, port):
        with dsocket.create_connection((lan.address, port), timeout=60) as c:
            assert c.dmm_stack == "lan0"
            c.sendall(data)
            c.shutdown(dsocket.SHUT_WR)
            digest = b""
            while part := c.recv(64):
                digest += part
    assert digest.decode() == hashlib.sha256(data).hexdigest()
    sent = stack_counters()

    with lan.serve(SOURCE.replace("sys.argv[2]", "2").replace("sys.argv[3]", str(SIZE))) as (_, port):
        h = hashlib.sha256()
        n = 0
        with dsocket.create_connection((lan.address, port), timeout=60) as c:
            buf = bytearray(1 << 20)
            while k := c.recv_into(buf):
                h.update(memoryview(buf)[:k])
                n += k
    assert n == SIZE
    assert h.hexdigest() == hashlib.sha256(random.Random(2).randbytes(SIZE)).hexdigest()
    got = stack_counters()

    frames_out = sent["packets_sent"]
    if lan.offload:
        # The upload went mostly in super-frames: far fewer frames than
        # 1,460-byte segments would need, and the download too.
        assert sent["tso_frames"] > 0, sent
        assert frames_out < SIZE / 1448 / 4, sent
        assert got["packets_received"] - sent["packets_received"] < SIZE / 1448 / 4, got
    else:
        assert sent["tso_frames"] == 0, sent
        assert frames_out > SIZE / 1460, sent
    assert got["csum_dropped"] == 0, got


def checksum16(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(src, dst, dport, payload, corrupt):
    """A broadcast Ethernet frame with an IPv4 UDP datagram; its UDP
    checksum is wrong if ``corrupt``."""
    sip, dip = socket.inet_aton(src), socket.inet_aton(dst)
    udp_len = 8 + len(payload)
    pseudo = sip + dip + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", 40000, dport, udp_len, 0) + payload
    csum = checksum16(pseudo + udp) or 0xFFFF
    if corrupt:
        csum ^= 0x0101
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, sip, dip)
    ip = ip[:10] + struct.pack("!H", checksum16(ip)) + ip[12:]
    eth = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x99" + b"\x08\x00"
    return (eth + ip + udp).hex()


def test_a_frame_with_a_bad_checksum_is_dropped_and_the_next_good_one_arrives(lan):
    me = f"{lan.subnet}.2"
    with dsocket.socket(dsocket.AF_INET, dsocket.SOCK_DGRAM) as s:
        # The first sendto routes the socket (to smoltcp) and binds it.
        s.sendto(b"hello", (lan.address, 9))
        assert s.dmm_stack == "lan0"
        port = s.getsockname()[1]
        before = stack_counters()["csum_dropped"]
        frames = [udp_frame(lan.address, me, port, b"bad", corrupt=True),
                  udp_frame(lan.address, me, port, b"good", corrupt=False)]
        done = lan.run(INJECT, lan.device, *frames)
        assert done.returncode == 0, done.stderr
        s.settimeout(10)
        data, addr = s.recvfrom(100)
        assert (data, addr) == (b"good", (lan.address, 40000))
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recvfrom(100)
        dropped = stack_counters()["csum_dropped"] - before
    # Who checks is the mode's business: the device counts what it drops.
    assert dropped == (1 if lan.offload else 0)
