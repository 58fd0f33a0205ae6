#!/usr/bin/env python3
"""A hostile BGP neighbour for crates/ferrynet/tests/bgp.rs.

Connects to TARGET:179 as AS LOCAL_AS (router id ROUTER_ID), completes the OPEN exchange,
then announces prefixes the agent must refuse (outside the pools, a /32 outside them, the
agent's own block OWN, a /32 inside it, and one in the pool through a next hop that is not on
the link), and finally
sends a malformed UPDATE (an attribute longer than the message). Prints one line per step
and `notification CODE SUBCODE` for the NOTIFICATION it gets back.
"""
import ipaddress
import socket
import struct
import sys
import time

MARKER = b"\xff" * 16


def msg(kind, body):
    return MARKER + struct.pack("!HB", 19 + len(body), kind) + body


def read_msg(s):
    head = b""
    while len(head) < 19:
        chunk = s.recv(19 - len(head))
        if not chunk:
            raise EOFError("connection closed")
        head += chunk
    length, kind = struct.unpack("!HB", head[16:19])
    body = b""
    while len(body) < length - 19:
        chunk = s.recv(length - 19 - len(body))
        if not chunk:
            raise EOFError("connection closed")
        body += chunk
    return kind, body


def nlri(prefix):
    net = ipaddress.ip_network(prefix)
    octets = (net.prefixlen + 7) // 8
    return bytes([net.prefixlen]) + net.network_address.packed[:octets]


def update(prefixes, next_hop, asn):
    attrs = b"\x40\x01\x01\x00"  # ORIGIN IGP
    attrs += b"\x40\x02\x06\x02\x01" + struct.pack("!I", asn)  # AS_PATH, 4-byte
    attrs += b"\x40\x03\x04" + ipaddress.ip_address(next_hop).packed  # NEXT_HOP
    body = struct.pack("!H", 0) + struct.pack("!H", len(attrs)) + attrs
    body += b"".join(nlri(p) for p in prefixes)
    return msg(2, body)


def main():
    target, local_as, router_id, own, me = sys.argv[1:6]
    local_as = int(local_as)
    s = socket.create_connection((target, 179), timeout=10)
    caps = b"\x01\x04\x00\x01\x00\x01"  # MP IPv4 unicast
    caps += b"\x41\x04" + struct.pack("!I", local_as)  # 4-byte AS
    params = b"\x02" + bytes([len(caps)]) + caps
    two_byte = local_as if local_as < 65536 else 23456
    body = struct.pack("!BHH", 4, two_byte, 30) + ipaddress.ip_address(router_id).packed
    s.sendall(msg(1, body + bytes([len(params)]) + params))
    kind, _ = read_msg(s)
    if kind != 1:
        print("expected OPEN, got", kind, flush=True)
        return 1
    s.sendall(msg(4, b""))
    while True:
        kind, _ = read_msg(s)
        if kind == 4:
            break
    print("established", flush=True)
    inside = ipaddress.ip_network(own).network_address + 5
    s.sendall(update(["192.168.99.0/24", "10.0.0.0/8", "192.168.99.7/32", own, f"{inside}/32"], me, local_as))
    s.sendall(update(["10.20.99.0/26"], "172.31.1.99", local_as))
    time.sleep(1)
    print("sent-hostile", flush=True)
    # An ORIGIN attribute claiming 200 bytes in a message that has 1.
    bad = struct.pack("!H", 0) + struct.pack("!H", 4) + b"\x40\x01\xc8\x00"
    s.sendall(msg(2, bad))
    try:
        while True:
            kind, body = read_msg(s)
            if kind == 3:
                print("notification", body[0], body[1], flush=True)
                return 0
    except (EOFError, OSError) as e:
        print("no notification:", e, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
