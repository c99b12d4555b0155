#!/usr/bin/env python3
"""A Thynapse cell written against the raw wire protocol (PROTOCOL.md).

Only pyzmq and the standard library: no SDK. Two modes:

    python3 raw_cell.py --command tcp://127.0.0.1:5454 [--token T]
        A demo worker: joins as service "python-demo", listens anycatch on
        --pattern (default "demo::*"), prints and acks every delivery, and
        PINGs every heartbeat_ms. Ctrl-C says GBYE and exits.

    python3 raw_cell.py --command tcp://127.0.0.1:5454 [--token T] --selftest
        An interop test against a running transmitter: THID test vectors,
        handshake, anycatch with batch acks, multicatch (J EVNT on the
        DEALER), membership events on a SUB with the SYNC handshake, computed
        event THIDs, batches of events both ways, plain and packed (one
        binary frame for the whole batch), error codes, GBYE. Every wait
        has a deadline. Prints
        "raw_cell selftest: ok" and exits 0 on success; prints one line
        saying what failed and exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import secrets
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import zmq

# --------------------------------------------------------------------------
# Protocol helpers (PROTOCOL.md §2, §9, §10)
# --------------------------------------------------------------------------

#: PROTOCOL.md §9: (from, seq, channel, payload bytes, THID).
THID_TEST_VECTORS = [
    ("0000000000000000000000000000000000000001", 1, "billing::invoice::paid",
     b'{"amount":42}', "148a4ee4688b0986a14a263c835b18af1f96cf81"),
    ("0000000000000000000000000000000000000001", 2, "billing::invoice::paid",
     b'{"amount":42}', "6c71b12a14904ce01eb84382f632d85f97b23bf2"),
    ("0000000000000000000000000000000000000001", 0, "a",
     b"", "bca398c84913300f5048feac7d0f4f5b9440e848"),
]


def event_thid(from_hex: str, seq: int, channel: str, payload: bytes) -> str:
    """The THID of an event: sha1(from "\\n" seq "\\n" channel "\\n" payload)."""
    head = f"{from_hex.lower()}\n{seq}\n{channel}\n".encode()
    return hashlib.sha1(head + payload).hexdigest()


def new_thid() -> str:
    """A random THID for a cell: 20 random bytes as 40 lowercase hex."""
    return secrets.token_hex(20)


def encode(verb: str, body: dict | str | None = None) -> bytes:
    """`J VERB {json}`. A str body is sent as is (raw JSON text)."""
    if body is None:
        return f"J {verb}".encode()
    if isinstance(body, dict):
        body = json.dumps(body, separators=(",", ":"))
    return f"J {verb} {body}".encode()


class Msg(NamedTuple):
    """A decoded command-socket message."""

    verb: str
    body: dict
    raw: bytes  # the JSON body as received
    binary: bytes | None  # the optional second frame


def decode(frames: list[bytes]) -> Msg:
    """Decodes `J VERB {json}` (or the unprefixed `VERB {json}`)."""
    head = frames[0]
    if len(head) >= 2 and head[1:2] == b" ":
        encoding, head = head[:1], head[2:]
        if encoding != b"J":
            raise ValueError(f"unsupported encoding {encoding!r}")
    verb = head[:4].decode("ascii", "replace")
    if len(head) < 4 or not verb.isascii() or not verb.isupper() or \
            (len(head) > 4 and head[4:5] != b" "):
        raise ValueError(f"not a command frame: {frames[0][:60]!r}")
    raw = head[5:].strip() or b"{}"
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError(f"{verb} body is not a JSON object")
    return Msg(verb, body, raw, frames[1] if len(frames) > 1 else None)


def pattern_matches(pattern: str, channel: str) -> bool:
    """Exact, trailing-star prefix, or anchored glob with * and ? (§10)."""
    wild = pattern.count("*") + pattern.count("?")
    if wild == 0:
        return pattern == channel
    if wild == 1 and pattern.endswith("*"):
        return channel.startswith(pattern[:-1])
    pat, text = pattern.encode(), channel.encode()
    p = t = 0
    star = None  # (pattern index of the last *, text index it resumes at)
    while t < len(text):
        if p < len(pat) and pat[p] == ord("*"):
            star = (p, t)
            p += 1
        elif p < len(pat) and (pat[p] == ord("?") or pat[p] == text[t]):
            p += 1
            t += 1
        elif star is not None:
            p, t = star[0] + 1, star[1] + 1
            star = (star[0], t)
        else:
            return False
    return all(c == ord("*") for c in pat[p:])


# --------------------------------------------------------------------------
# A cell: one DEALER (commands, deliveries, multicatch events) and, to
# follow membership, one SUB (PROTOCOL.md §18)
# --------------------------------------------------------------------------


class Failure(Exception):
    """A selftest check failed; the message is the one-line reason."""


#: The ref of the PINGs `Cell.keepalive` sends; their PONGs are dropped.
KEEPALIVE_REF = "keepalive"

#: Longest single poll, so that waiting cells keep the others alive.
POLL_SLICE = 0.1


class Cell:
    """One cell connection. Messages received while waiting for something
    else are kept in `pending`, so replies and deliveries can interleave.

    While any cell of this process waits, every welcomed cell that has sent
    nothing for heartbeat_ms sends a PING (PROTOCOL.md §7), so that a cell
    waiting on another one is not expired."""

    #: Every open cell of this process.
    live: list[Cell] = []

    def __init__(self, ctx: zmq.Context, command: str, token: str | None,
                 timeout: float, name: str = "cell"):
        self.ctx = ctx
        self.command = command
        self.token = token
        self.timeout = timeout
        self.name = name
        self.thid = new_thid()
        self.welcome: dict | None = None
        self.pending: collections.deque[Msg] = collections.deque()
        self.sub: zmq.Socket | None = None
        self.sync_count = 0
        self.last_sent = time.monotonic()
        self.dealer = self._socket(zmq.DEALER)
        self.dealer.connect(command)
        Cell.live.append(self)

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 1000  # long enough to flush a final GBYE, bounded
        if self.token is not None:  # PROTOCOL.md §13
            sock.plain_username = b"cell"
            sock.plain_password = self.token.encode()
        return sock

    # -- command socket ----------------------------------------------------

    def send(self, verb: str, body: dict | str | None = None,
             binary: bytes | None = None) -> None:
        frames = [encode(verb, body)]
        if binary is not None:
            frames.append(binary)
        self.send_frames(frames)

    def send_frames(self, frames: list[bytes]) -> None:
        try:
            self.dealer.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise Failure(f"{self.name}: cannot send {frames[0][:40]!r}: "
                          "not connected (wrong endpoint or token?)")
        self.last_sent = time.monotonic()

    @staticmethod
    def keep_all_alive() -> None:
        now = time.monotonic()
        for c in Cell.live:
            if c.welcome and now - c.last_sent >= c.welcome["heartbeat_ms"] / 1000:
                c.send("PING", {"ref": KEEPALIVE_REF})

    def recv(self, timeout: float) -> Msg | None:
        """The next message, from `pending` first; None after `timeout` s."""
        if self.pending:
            return self.pending.popleft()
        frames = self.recv_frames(timeout)
        if frames is None:
            return None
        try:
            return decode(frames)
        except ValueError as e:
            raise Failure(f"{self.name}: transmitter sent a bad frame: {e}")

    def recv_frames(self, timeout: float) -> list[bytes] | None:
        """The frames of the next message off the socket (`pending` aside),
        undecoded: a batch's body is an array, which `decode` refuses.
        Keepalive PONGs are dropped; None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            Cell.keep_all_alive()
            left = deadline - time.monotonic()
            if not self.dealer.poll(int(max(0.0, min(left, POLL_SLICE)) * 1000)):
                if left <= POLL_SLICE:
                    return None
                continue
            frames = self.dealer.recv_multipart()
            if frames[0].startswith(b"J PONG ") and \
                    json.loads(frames[0][len(b"J PONG "):]).get("ref") == KEEPALIVE_REF:
                continue
            return frames

    def wait_for(self, what: str, pred: Callable[[Msg], bool],
                 timeout: float | None = None) -> Msg:
        """The first message satisfying `pred`; others stay pending."""
        deadline = time.monotonic() + (timeout or self.timeout)
        skipped: list[Msg] = []
        try:
            # Look through what is already pending, then read the socket.
            while self.pending:
                m = self.pending.popleft()
                if pred(m):
                    return m
                skipped.append(m)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = ", ".join(f"{m.verb} {m.raw[:80].decode('utf-8', 'replace')}"
                                     for m in skipped[-3:]) or "nothing"
                    raise Failure(f"{self.name}: timed out waiting for {what} "
                                  f"(last received: {seen})")
                m = self.recv(left)
                if m is None:
                    continue
                if pred(m):
                    return m
                skipped.append(m)
        finally:
            self.pending.extendleft(reversed(skipped))

    def reply(self, verb: str, ref: Any, timeout: float | None = None) -> Msg:
        """Waits for `verb` with this ref, failing early on an ERRR for it."""
        m = self.wait_for(f"{verb} ref={ref!r}",
                          lambda m: (m.verb == verb and m.body.get("ref") == ref)
                          or (m.verb == "ERRR" and m.body.get("re") == ref),
                          timeout)
        if m.verb == "ERRR":
            raise Failure(f"{self.name}: expected {verb} for ref {ref!r}, got "
                          f"ERRR {m.raw.decode('utf-8', 'replace')}")
        return m

    def hello(self, service: str, metadata: dict | None = None,
              ref: Any = "helo") -> dict:
        body = {"id": self.thid, "service": service, "ref": ref}
        if metadata:
            body["metadata"] = metadata
        self.send("HELO", body)
        w = self.reply("WLCM", ref).body
        for field, kind in (("id", str), ("pub", str), ("heartbeat_ms", int),
                            ("limits", dict)):
            if not isinstance(w.get(field), kind):
                raise Failure(f"{self.name}: WLCM field {field!r} missing or "
                              f"not {kind.__name__}: {w}")
        if not is_thid(w["id"]):
            raise Failure(f"{self.name}: WLCM id is not a THID: {w['id']!r}")
        self.welcome = w
        return w

    def listen(self, pattern: str, mode: str, ack: bool | None = None,
               ref: Any = None) -> None:
        body: dict[str, Any] = {"pattern": pattern, "mode": mode}
        if ack is not None:
            body["ack"] = ack
        ref = ref if ref is not None else f"lstn {pattern}"
        body["ref"] = ref
        self.send("LSTN", body)
        self.reply("OKAY", ref)

    def bye(self, reason: str = "done") -> None:
        self.send("GBYE", {"reason": reason})

    def next_event(self, pattern: str, timeout: float | None = None) -> Msg:
        """The next multicatch event (`J EVNT`, PROTOCOL.md §6); other
        messages stay pending. Its channel must match `pattern`: the
        transmitter sends only events the cell listens to."""
        m = self.wait_for("EVNT", lambda m: m.verb == "EVNT", timeout)
        channel = m.body.get("channel")
        if not isinstance(channel, str) or not pattern_matches(pattern, channel):
            raise Failure(f"{self.name}: EVNT on {channel!r}, which {pattern!r} "
                          "does not match")
        return m

    # -- event socket (membership, PROTOCOL.md §18) -------------------------

    def open_sub(self) -> None:
        assert self.welcome is not None
        endpoint = self.welcome["pub"]
        host = endpoint.rsplit(":", 1)[0].split("://", 1)[-1]
        if host in ("0.0.0.0", "*", "[::]"):  # a wildcard bind: use our host
            cmd_host = self.command.rsplit(":", 1)[0]
            endpoint = cmd_host + ":" + endpoint.rsplit(":", 1)[1]
        self.sub = self._socket(zmq.SUB)
        self.sub.connect(endpoint)

    def follow(self, service: str) -> None:
        """Subscribes to the membership events of `service`, then the SYNC
        handshake: once it returns, the subscription is in place."""
        assert self.sub is not None
        self.sub.subscribe(f"MEMB {service} ".encode())
        self.sync_count += 1
        marker = f"SYNC {self.thid}-{self.sync_count}".encode()
        self.sub.subscribe(marker)
        frames = self.recv_published(self.timeout)
        if frames is None:
            raise Failure(f"{self.name}: no {marker.decode()!r} frame on the "
                          "event socket (SYNC handshake)")
        if frames[0] != marker:
            raise Failure(f"{self.name}: {frames[0][:80]!r} on the event socket "
                          f"before {marker.decode()!r}")
        self.sub.unsubscribe(marker)

    def recv_published(self, timeout: float) -> list[bytes] | None:
        assert self.sub is not None
        deadline = time.monotonic() + timeout
        while True:
            Cell.keep_all_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.sub.poll(int(min(left, POLL_SLICE) * 1000)):
                return self.sub.recv_multipart()

    def next_membership(self, service: str, timeout: float | None = None) -> dict:
        """The body of the next `MEMB <service> {json}` frame."""
        frames = self.recv_published(timeout or self.timeout)
        if frames is None:
            raise Failure(f"{self.name}: no MEMB {service} frame on the event socket")
        head = f"MEMB {service} ".encode()
        if not frames[0].startswith(head):
            raise Failure(f"{self.name}: expected a MEMB {service} frame, got "
                          f"{frames[0][:80]!r}")
        try:
            return json.loads(frames[0][len(head):])
        except ValueError:
            raise Failure(f"{self.name}: bad JSON on the event socket: {frames[0][:80]!r}")

    def close(self) -> None:
        if self in Cell.live:
            Cell.live.remove(self)
        for s in (self.dealer, self.sub):
            if s is not None:
                s.close()


def is_thid(s: Any) -> bool:
    return isinstance(s, str) and len(s) == 40 and \
        all(c in "0123456789abcdef" for c in s)


# --------------------------------------------------------------------------
# --selftest
# --------------------------------------------------------------------------

N_EVENTS = 20
ANY_CHANNEL = "interop::any::x"
MULTI_CHANNEL = "interop::multi::y"


def check(cond: bool, reason: str) -> None:
    if not cond:
        raise Failure(reason)


#: PROTOCOL.md §10: (pattern, channel, matches).
PATTERN_EXAMPLES = [
    ("billing::invoice::paid", "billing::invoice::paid", True),
    ("billing::invoice::paid", "billing::invoice::paid2", False),
    ("billing::invoice", "billing::invoice::paid", False),
    ("billing::*", "billing::invoice::paid", True),
    ("billing::*", "billing::", True),
    ("billing::*", "shipping::x", False),
    ("*", "anything::at::all", True),
    ("*::paid", "billing::invoice::paid", True),
    ("*::paid", "billing::paid::late", False),
    ("*::invoice::*", "billing::invoice::paid", True),
    ("billing::?nvoice::*", "billing::invoice::x", True),
    ("billing::?nvoice::*", "billing::nvoice::x", False),
    ("a?c", "abc", True),
    ("a?c", "ac", False),
]


def check_vectors() -> None:
    for from_hex, seq, channel, payload, want in THID_TEST_VECTORS:
        got = event_thid(from_hex, seq, channel, payload)
        check(got == want, f"THID vector seq={seq} {channel!r}: {got} != {want}")
    for pattern, channel, want in PATTERN_EXAMPLES:
        check(pattern_matches(pattern, channel) == want,
              f"pattern {pattern!r} vs {channel!r}: expected match={want}")


def expect_error(cell: Cell, code: str, what: str, re: Any = None,
                 any_re: bool = False) -> None:
    m = cell.wait_for(f"ERRR {code} for {what}", lambda m: m.verb == "ERRR")
    body = m.body
    check(body.get("code") == code,
          f"{what}: expected ERRR {code}, got {m.raw.decode('utf-8', 'replace')}")
    check(isinstance(body.get("message"), str),
          f"{what}: ERRR without a message: {body}")
    check("re" in body, f"{what}: ERRR without an 're' field: {body}")
    check(any_re or body["re"] == re,
          f"{what}: ERRR re={body['re']!r}, expected {re!r}")


def ping(cell: Cell, ref: str) -> None:
    """PING and wait for its PONG; fails on any ERRR received before it."""
    cell.send("PING", {"ref": ref})
    cell.reply("PONG", ref)
    errs = [m for m in cell.pending if m.verb == "ERRR"]
    check(not errs, f"{cell.name}: unexpected "
          f"{errs[0].raw.decode('utf-8', 'replace') if errs else ''}")


def selftest(args: argparse.Namespace) -> None:
    check_vectors()
    ctx = zmq.Context()
    cells: list[Cell] = []
    try:
        run_selftest(ctx, args, cells)
    finally:
        for c in cells:
            c.close()
        ctx.term()  # bounded: every socket has a 1 s linger


def run_selftest(ctx: zmq.Context, args: argparse.Namespace,
                 cells: list[Cell]) -> None:
    def cell(name: str) -> Cell:
        c = Cell(ctx, args.command, args.token, args.timeout, name)
        cells.append(c)
        return c

    # b) cell A joins, follows the membership of service interop-b (SYNC)
    # and listens any + multi.
    a = cell("cell A")
    wa = a.hello("interop-a", {"lang": "python", "role": "listener"}, "helo-a")
    limits = wa["limits"]
    check(isinstance(limits.get("max_frame"), int)
          and isinstance(limits.get("ack_timeout_ms"), int),
          f"WLCM limits incomplete: {limits}")
    a.open_sub()
    a.follow("interop-b")
    a.listen("interop::any::*", "any", ref="lstn-any")
    a.listen("interop::multi::*", "multi", ref="lstn-multi")

    # c) cell B publishes; the transmitter computes each THID from "seq".
    b = cell("cell B")
    b.hello("interop-b", {"lang": "python", "role": "publisher"}, "helo-b")
    joined = a.next_membership("interop-b")
    member = joined.get("cell") or {}
    check(joined.get("event") == "joined" and member.get("id") == b.thid,
          f"MEMB interop-b: expected B joined, got {joined}")
    check(member.get("service") == "interop-b"
          and (member.get("metadata") or {}).get("role") == "publisher"
          and is_thid(member.get("transmitter")),
          f"MEMB interop-b: B's record is wrong: {member}")
    sent: dict[str, list[tuple[str, str]]] = {ANY_CHANNEL: [], MULTI_CHANNEL: []}
    seq = 0
    for channel in (ANY_CHANNEL, MULTI_CHANNEL):
        for i in range(N_EVENTS):
            seq += 1
            # Odd spacing and an escape on purpose: the THID covers the
            # payload text exactly as sent, not a re-serialization of it.
            payload = f'{{ "n":{i},  "seq" : {seq}, "text":"caf\\u00e9 {channel}" }}'
            body = (f'{{"channel":"{channel}","payload":{payload},'
                    f'"seq":{seq},"confirm":true,"ref":"ev-{seq}"}}')
            b.send("EVNT", body)
            sent[channel].append(
                (event_thid(b.thid, seq, channel, payload.encode()), payload))
    seq = 0
    for channel in (ANY_CHANNEL, MULTI_CHANNEL):
        for want_id, _ in sent[channel]:
            seq += 1
            ok = b.reply("OKAY", f"ev-{seq}").body
            check(ok.get("id") == want_id,
                  f"OKAY for seq {seq} on {channel}: id {ok.get('id')} != "
                  f"sha1 per spec {want_id}")
            check(ok.get("routed") == 1,
                  f"OKAY for seq {seq} on {channel}: routed {ok.get('routed')!r}, "
                  "expected 1")

    # A gets every anycatch event once, in publish order, and acks in a batch.
    ids = []
    for n, (want_id, payload) in enumerate(sent[ANY_CHANNEL], 1):
        m = a.wait_for(f"DLVR #{n}", lambda m: m.verb == "DLVR")
        d = m.body
        check(d.get("id") == want_id,
              f"DLVR #{n}: id {d.get('id')} != sha1 per spec {want_id}")
        check(d.get("channel") == ANY_CHANNEL, f"DLVR #{n}: channel {d.get('channel')!r}")
        check(d.get("from") == b.thid, f"DLVR #{n}: from {d.get('from')} != {b.thid}")
        check(d.get("attempt") == 1, f"DLVR #{n}: attempt {d.get('attempt')!r}")
        check(d.get("payload") == json.loads(payload), f"DLVR #{n}: payload {d.get('payload')!r}")
        check(b'"payload":' + payload.encode() in m.raw,
              f"DLVR #{n}: payload not forwarded byte for byte: {m.raw[:200]!r}")
        check(m.binary is None, f"DLVR #{n}: unexpected binary frame")
        ids.append(d["id"])
    a.send("ACKN", {"ids": ids})
    ping(a, "after-ackn")  # an unknown_delivery ERRR would arrive before this PONG

    # A gets every multicatch event on its DEALER, in publish order, with
    # no attempt: nothing to ack.
    for n, (want_id, payload) in enumerate(sent[MULTI_CHANNEL], 1):
        m = a.next_event("interop::multi::*")
        e = m.body
        check(e.get("id") == want_id, f"EVNT #{n}: id {e.get('id')} != sha1 per spec {want_id}")
        check(e.get("channel") == MULTI_CHANNEL and e.get("from") == b.thid,
              f"EVNT #{n}: channel/from wrong: {e}")
        check(e.get("payload") == json.loads(payload), f"EVNT #{n}: payload {e.get('payload')!r}")
        check(b'"payload":' + payload.encode() in m.raw,
              f"EVNT #{n}: payload not forwarded byte for byte: {m.raw[:200]!r}")
        check("attempt" not in e, f"EVNT #{n}: has an attempt field: {e}")
        check(m.binary is None, f"EVNT #{n}: unexpected binary frame")
    check(not any(m.verb == "DLVR" for m in a.pending),
          "cell A got a DLVR for a multicatch-only channel")
    first_multi = sent[MULTI_CHANNEL][0][0]
    a.send("ACKN", {"id": first_multi})
    expect_error(a, "unknown_delivery", "ACKN of a multicatch event", re=first_multi)

    # A confirmed event nobody listens to is refused at once.
    b.send("EVNT", {"channel": "interop::nobody::z", "payload": {}, "seq": 1000,
                    "confirm": True, "ref": "ev-nobody"})
    expect_error(b, "no_listeners", "confirmed EVNT with no listener", re="ev-nobody")

    # d) errors, each answered on a live connection that keeps working.
    a.send_frames([b"not a command"])
    expect_error(a, "bad_frame", "a malformed frame", re=None)
    a.send_frames([b'J ABCD {"ref":"r-unknown"}'])
    expect_error(a, "unknown_verb", "unknown verb ABCD", re="r-unknown")
    a.send_frames([b'J LSTN {"pattern":"interop::*","mode":'])
    expect_error(a, "bad_json", "bad JSON", re=None)
    a.send_frames([b'J PING {"ref":"r-multipart"}', b"one", b"two"])
    expect_error(a, "bad_multipart", "a 3-frame message", any_re=True)
    ping(a, "after-errors")

    d, e = cell("cell D"), cell("cell E")
    check_batches(d, b)
    check_packed(d, e, b)

    c = cell("cell C")
    c.send("LSTN", {"pattern": "interop::*", "mode": "any", "ref": "r-early"})
    expect_error(c, "not_welcomed", "LSTN before HELO", re="r-early")

    leftovers = [m for x in (a, b, c, d, e) for m in x.pending]
    check(not leftovers, f"unexpected {leftovers[0].verb} "
          f"{leftovers[0].raw[:120].decode('utf-8', 'replace')}" if leftovers else "")

    # e) both cells leave; A sees B go.
    b.bye("selftest done")
    left = a.next_membership("interop-b")
    check(left.get("event") == "left" and (left.get("cell") or {}).get("id") == b.thid,
          f"MEMB interop-b: expected B left, got {left}")
    a.bye("selftest done")


def check_batches(d: Cell, b: Cell) -> None:
    """PROTOCOL.md §23: B publishes three events in one EVNT (a JSON array
    and one binary frame each); D, which said HELO with "batch", gets them
    as one DLVR array with their binary frames, in order."""
    d.send("HELO", {"id": d.thid, "service": "interop-d", "batch": True,
                    "ref": "helo-d"})
    d.welcome = d.reply("WLCM", "helo-d").body
    check(d.welcome.get("batch") is True, f"WLCM without batch: {d.welcome}")
    d.listen("interop::batch::*", "any", ack=False, ref="lstn-batch")
    events = [{"channel": f"interop::batch::{i}", "seq": 2000 + i} for i in range(3)]
    binaries = [bytes([i, 0xff]) for i in range(3)]
    b.send_frames([encode("EVNT", json.dumps(events))] + binaries)
    frames = d.recv_frames(d.timeout)
    if frames is None:
        raise Failure(f"no batch for cell D within {d.timeout} s")
    check(frames[0].startswith(b"J DLVR ["), f"not a DLVR batch: {frames[0][:80]!r}")
    items = json.loads(frames[0][len(b"J DLVR "):])
    check([i.get("channel") for i in items] == [e["channel"] for e in events],
          f"batch out of order or incomplete: {items}")
    check(all(i.get("id") == event_thid(b.thid, e["seq"], e["channel"], bin_)
              for i, e, bin_ in zip(items, events, binaries)),
          f"batch THIDs not per spec: {items}")
    check(frames[1:] == binaries, f"binary frames not one per event, in order: {frames[1:]}")


#: Events per packed batch the selftest publishes: enough that the
#: transmitter has several deliveries ready at once for a cell.
N_PACKED = 50


class Event(NamedTuple):
    """An event as published: what its delivery must carry."""

    channel: str
    seq: int
    payload: bytes  # the binary payload


def packed_batch(events: list[Event], bins: list[int | None] | None = None,
                 frames: list[bytes] | None = None) -> list[bytes]:
    """`J EVNT [...]` packed (PROTOCOL.md §23): each element's "bin" is its
    payload's length, last, and one binary frame follows, the payloads
    concatenated. `bins` (None: no "bin") and `frames` replace the right
    ones, to break the rules."""
    bins = bins if bins is not None else [len(e.payload) for e in events]
    body = [{"channel": e.channel, "seq": e.seq} | ({} if n is None else {"bin": n})
            for e, n in zip(events, bins)]
    head = encode("EVNT", json.dumps(body, separators=(",", ":")))
    return [head] + (frames if frames is not None
                     else [b"".join(e.payload for e in events)])


def unbatch(frames: list[bytes], verb: str, who: str,
            packed_ok: bool) -> tuple[list[tuple[dict, bytes]], bool]:
    """The (body, binary payload) of each event of one `verb` message, a
    single one with its own binary frame, a batch with one binary frame
    per element or (only when `packed_ok`) a packed batch; and whether it
    was packed. Fails on anything else."""
    head = f"J {verb} ".encode()
    check(frames[0].startswith(head), f"{who}: expected {verb}, got {frames[0][:80]!r}")
    body, binaries = json.loads(frames[0][len(head):]), frames[1:]
    if isinstance(body, dict):
        check("bin" not in body and len(binaries) == 1,
              f"{who}: a single {verb} not in the plain form: {frames}")
        return [(body, binaries[0])], False
    check(isinstance(body, list) and body and all(isinstance(e, dict) for e in body),
          f"{who}: {verb} body is neither an object nor an array of them")
    if "bin" not in body[0]:
        check(not any("bin" in e for e in body) and len(binaries) == len(body),
              f"{who}: unpacked {verb} batch of {len(body)} with {len(binaries)} "
              f"binary frames or a bin: {frames[0][:200]!r}")
        return list(zip(body, binaries)), False
    check(packed_ok, f"{who}: a packed {verb} batch, though it did not say packed")
    check(len(body) > 1, f"{who}: a packed batch of one: {frames[0][:200]!r}")
    check(all(list(e)[-1] == "bin" and isinstance(e["bin"], int) for e in body),
          f"{who}: packed {verb} batch whose elements lack a last bin: {frames[0][:200]!r}")
    sizes = [e.pop("bin") for e in body]
    check(len(binaries) == 1 and len(binaries[0]) == sum(sizes),
          f"{who}: packed {verb} batch with bins summing to {sum(sizes)} and "
          f"binary frames of {[len(b) for b in binaries]} bytes")
    ends = list(itertools.accumulate(sizes))
    return [(e, binaries[0][end - n:end]) for e, n, end in zip(body, sizes, ends)], True


def receive_events(cell: Cell, verb: str, want: list[Event], publisher: str,
                   packed_ok: bool) -> int:
    """Requires `cell`'s next messages to deliver exactly `want`, in order,
    with their payloads byte for byte and their THIDs per §9 (as though
    each payload had a frame of its own); returns how many came packed."""
    got: list[tuple[dict, bytes]] = []
    packed = 0
    while len(got) < len(want):
        frames = cell.recv_frames(cell.timeout)
        if frames is None:
            raise Failure(f"{cell.name}: {len(got)} of {len(want)} events within "
                          f"{cell.timeout} s")
        events, was_packed = unbatch(frames, verb, cell.name, packed_ok)
        got += events
        packed += was_packed
    check(len(got) == len(want), f"{cell.name}: {len(got)} events, expected {len(want)}")
    for n, ((body, payload), e) in enumerate(zip(got, want)):
        what = f"{cell.name}: {verb} #{n} ({e.channel})"
        check(body.get("channel") == e.channel,
              f"{what}: out of order or unexpected, got {body.get('channel')!r}")
        check(payload == e.payload, f"{what}: payload {payload!r} != {e.payload!r}")
        check(body.get("id") == event_thid(publisher, e.seq, e.channel, e.payload),
              f"{what}: id {body.get('id')} not per spec")
        check(body.get("from") == publisher, f"{what}: from {body.get('from')}")
        check((body.get("attempt") == 1) == (verb == "DLVR"),
              f"{what}: attempt {body.get('attempt')!r}")
    return packed


def check_packed(d: Cell, e: Cell, b: Cell) -> None:
    """PROTOCOL.md §23, packed binary frames. E says HELO with "batch" and
    "packed" and listens beside D (same pattern, another service). B
    publishes N_PACKED binary events in one packed EVNT: E gets them,
    at least once as a packed DLVR batch, D (not packed) never packed.
    Batches that break the packing rules are refused whole and deliver
    nothing. A multicatch listener gets packed EVNT batches."""
    e.send("HELO", {"id": e.thid, "service": "interop-e", "batch": True,
                    "packed": True, "ref": "helo-e"})
    e.welcome = e.reply("WLCM", "helo-e").body
    check(e.welcome.get("packed") is True, f"WLCM without packed: {e.welcome}")
    e.listen("interop::batch::*", "any", ack=False, ref="lstn-packed-any")
    e.listen("interop::packed::*", "multi", ref="lstn-packed-multi")

    def events(prefix: str, seq: int) -> list[Event]:
        # Lengths 0 to 12, every byte value: the split is by "bin" alone.
        return [Event(f"{prefix}{i}", seq + i,
                      bytes((i * 31 + j) % 256 for j in range(i % 5 * 3)))
                for i in range(N_PACKED)]

    anycatch = events("interop::batch::p", 3000)
    b.send_frames(packed_batch(anycatch))
    check(receive_events(e, "DLVR", anycatch, b.thid, packed_ok=True) > 0,
          f"{e.name}: {N_PACKED} events published at once, none came packed")
    receive_events(d, "DLVR", anycatch, b.thid, packed_ok=False)

    bad = events("interop::batch::bad", 4000)[1:4]  # every length nonzero
    total = sum(len(x.payload) for x in bad)
    for why, frames in (
            ("a frame 1 byte short of the bins", packed_batch(
                bad, frames=[b"".join(x.payload for x in bad)[:-1]])),
            ("an element without bin", packed_batch(
                bad, bins=[3, None, 9], frames=[bad[0].payload + bad[2].payload])),
            ("bin on a later element only", packed_batch(
                bad, bins=[None, 6, None], frames=[x.payload for x in bad])),
            ("two binary frames", packed_batch(
                bad, frames=[b"\0" * total, b""]))):
        b.send_frames(frames)
        expect_error(b, "bad_multipart", f"a packed EVNT with {why}", re=None)
    sentinel = [Event("interop::batch::after-bad", 4999, b"\x05")]
    b.send("EVNT", {"channel": sentinel[0].channel, "seq": sentinel[0].seq},
           sentinel[0].payload)
    for c in (e, d):  # the sentinel first: no refused event got through
        receive_events(c, "DLVR", sentinel, b.thid, packed_ok=c is e)

    multicatch = events("interop::packed::m", 5000)
    b.send_frames(packed_batch(multicatch))
    check(receive_events(e, "EVNT", multicatch, b.thid, packed_ok=True) > 0,
          f"{e.name}: {N_PACKED} multicatch events published at once, none came packed")


# --------------------------------------------------------------------------
# Demo worker
# --------------------------------------------------------------------------


def demo(args: argparse.Namespace) -> None:
    ctx = zmq.Context()
    c = Cell(ctx, args.command, args.token, args.timeout, "demo")
    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def join() -> float:
        w = c.hello(args.service, {"lang": "python", "example": "raw_cell"})
        c.listen(args.pattern, "any")
        print(f"joined {args.command} as {args.service} ({c.thid}), "
              f"listening anycatch on {args.pattern}", flush=True)
        return w["heartbeat_ms"] / 1000

    try:
        heartbeat = join()
        next_ping = time.monotonic() + heartbeat
        last_heard = time.monotonic()
        handled = 0
        pings = 0
        while not stop["now"]:
            m = c.recv(max(0.0, next_ping - time.monotonic()))
            now = time.monotonic()
            if m is not None:
                last_heard = now
                if m.verb == "DLVR":
                    d = m.body
                    extra = f" + {len(m.binary)} binary bytes" if m.binary else ""
                    print(f"DLVR {d.get('channel')} id={d.get('id')} attempt="
                          f"{d.get('attempt')} payload={json.dumps(d.get('payload'))}"
                          f"{extra}", flush=True)
                    c.send("ACKN", {"id": d["id"]})
                    handled += 1
                    if args.count and handled >= args.count:
                        break
                elif m.verb == "ERRR" and m.body.get("code") == "not_welcomed":
                    print("expired: joining again", flush=True)
                    heartbeat = join()
                elif m.verb == "GBYE":
                    print(f"transmitter says GBYE: {m.body.get('reason')}", flush=True)
                    return
                elif m.verb == "PING":
                    c.send("PONG", {"ref": m.body["ref"]} if "ref" in m.body else None)
                elif m.verb != "PONG":
                    print(f"{m.verb} {m.raw.decode('utf-8', 'replace')}", flush=True)
            if now >= next_ping:
                pings += 1
                c.send("PING", {"ref": pings})
                next_ping = now + heartbeat
                if now - last_heard > 3 * heartbeat:
                    print("no answer from the transmitter for "
                          f"{now - last_heard:.1f} s", file=sys.stderr, flush=True)
        c.bye("stopped")
    finally:
        c.close()
        ctx.term()


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--command", required=True,
                    help="the transmitter's command endpoint, e.g. tcp://127.0.0.1:5454")
    ap.add_argument("--token", help="PLAIN password (the transmitter's token)")
    ap.add_argument("--selftest", action="store_true",
                    help="run the interop selftest instead of the demo worker")
    ap.add_argument("--pattern", default="demo::*", help="demo: anycatch pattern")
    ap.add_argument("--service", default="python-demo", help="demo: service name")
    ap.add_argument("--count", type=int, default=0,
                    help="demo: exit after this many deliveries (0: never)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="deadline of each wait, in seconds (default 10)")
    args = ap.parse_args()

    if not args.selftest:
        demo(args)
        return 0

    # A watchdog over the whole run, on top of the deadline of every wait.
    def watchdog(_signum: int, _frame: Any) -> None:
        raise Failure("watchdog: the selftest took too long")

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(args.timeout * 6) + 10)
    try:
        selftest(args)
    except Failure as e:
        print(f"raw_cell selftest: FAIL: {e}", flush=True)
        return 1
    except Exception as e:  # any other failure is a failure too, on one line
        print(f"raw_cell selftest: FAIL: {type(e).__name__}: {e}", flush=True)
        return 1
    finally:
        signal.alarm(0)
    print("raw_cell selftest: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
