#!/usr/bin/env python3
"""A Thynapse responder written against the raw wire protocol: answers RQST with RPLY.

Only pyzmq and the standard library: the framing and the connection helpers
come from raw_cell.py beside this file (itself pyzmq only). Two modes:

    python3 raw_responder.py --command tcp://127.0.0.1:5454 [--token T]
        A demo responder: joins as service "python-calc", listens anycatch
        on --pattern (default "pycalc::*") with "concurrency" --concurrency,
        and answers every request with RPLY:
          <prefix>::add   {"a": x, "b": y} -> {"sum": x + y}
          <prefix>::echo  a binary frame   -> the same bytes, reversed
        anything else, or a payload that does not fit, gets
        RPLY {"id", "error": "..."}. It PINGs every heartbeat_ms and joins
        again when the transmitter no longer knows it (ERRR not_welcomed,
        or PONG {"welcomed": false}). Ctrl-C says GBYE and exits.

    python3 raw_responder.py --command tcp://127.0.0.1:5454 [--token T] --selftest
        An interop test against a running transmitter: a responder cell and
        a requester cell (a second DEALER) in this process; the requester's
        RQSTs get the responder's RPLYs (JSON and binary), a handler error,
        no_responders at once and timed_out at the deadline. Every wait has
        a deadline. Prints "raw_responder selftest: ok" and exits 0 on
        success; prints one line saying what failed and exits 1 otherwise.

Request/reply on the wire (the transmitter's router is the reference):

    requester  J RQST {"channel":C,"payload":P,"timeout_ms":N,"ref":R} [+ binary]
    responder  J RQST {"id":I,"channel":C,"payload":P,"from":F,"attempt":1} [+ binary]
    responder  J RPLY {"id":I,"payload":Q}   or   J RPLY {"id":I,"error":"why"}
    requester  J RPLY {"ref":R,"id":I,"payload":Q|"error":"why"} [+ binary]
               or J ERRR {"code":"no_responders"|"timed_out",...,"re":R}
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

import zmq

from raw_cell import Cell, Failure, Msg, check, expect_error, is_thid


class HandlerError(Exception):
    """The request cannot be answered; the message goes back as RPLY error."""


def handle(channel: str, payload: Any, binary: bytes | None
           ) -> tuple[Any, bytes | None]:
    """The calculator: (reply payload, reply binary frame) for a request."""
    op = channel.rsplit("::", 1)[-1]
    if op == "add":
        if not isinstance(payload, dict):
            raise HandlerError("add takes {\"a\": number, \"b\": number}")
        a, b = payload.get("a"), payload.get("b")
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool)
                      for x in (a, b))
        if not numbers:
            raise HandlerError(f"add takes two numbers, got a={a!r} b={b!r}")
        return {"sum": a + b}, None
    if op == "echo":
        if binary is None:
            raise HandlerError("echo takes a binary frame")
        return {"bytes": len(binary)}, binary[::-1]
    raise HandlerError(f"no operation {op!r} on {channel}")


def answer(cell: Cell, m: Msg) -> None:
    """Answers one RQST with RPLY: the result, or the handler's error."""
    d = m.body
    try:
        payload, binary = handle(d["channel"], d.get("payload"), m.binary)
        cell.send("RPLY", {"id": d["id"], "payload": payload}, binary)
    except HandlerError as e:
        cell.send("RPLY", {"id": d["id"], "error": str(e)})


def join(cell: Cell, service: str, pattern: str, concurrency: int) -> float:
    """HELO, then LSTN anycatch with a concurrency; the heartbeat in s."""
    w = cell.hello(service, {"lang": "python", "example": "raw_responder"})
    ref = f"lstn {pattern}"
    cell.send("LSTN", {"pattern": pattern, "mode": "any",
                       "concurrency": concurrency, "ref": ref})
    cell.reply("OKAY", ref)
    return w["heartbeat_ms"] / 1000


# --------------------------------------------------------------------------
# --selftest
# --------------------------------------------------------------------------

PATTERN = "pyrpc::*"


def request(q: Cell, ref: str, channel: str, payload: Any = None,
            binary: bytes | None = None, timeout_ms: int = 5000) -> None:
    body: dict[str, Any] = {"channel": channel, "timeout_ms": timeout_ms,
                            "ref": ref}
    if payload is not None:
        body["payload"] = payload
    q.send("RQST", body, binary)


def serve_one(r: Cell, q: Cell, channel: str) -> Msg:
    """The RQST the responder gets (checked field by field), answered."""
    m = r.wait_for(f"RQST on {channel}", lambda m: m.verb == "RQST")
    d = m.body
    check(is_thid(d.get("id")), f"RQST id is not a THID: {d}")
    check(d.get("channel") == channel, f"RQST channel: {d}")
    check(d.get("from") == q.thid, f"RQST from is not the requester: {d}")
    check(d.get("attempt") == 1, f"RQST attempt: {d}")
    answer(r, m)
    return m


def run_selftest(ctx: zmq.Context, args: argparse.Namespace,
                 cells: list[Cell]) -> None:
    def cell(name: str) -> Cell:
        c = Cell(ctx, args.command, args.token, args.timeout, name)
        cells.append(c)
        return c

    r = cell("responder")
    join(r, "py-responder", PATTERN, 2)
    q = cell("requester")
    q.hello("py-requester", None, "helo-q")

    # A JSON request and its reply; the reply's id is the request's.
    request(q, "rq-add", "pyrpc::add", {"a": 2, "b": 40})
    got = serve_one(r, q, "pyrpc::add")
    rp = q.reply("RPLY", "rq-add").body
    check(rp.get("payload") == {"sum": 42}, f"add reply: {rp}")
    check(rp.get("id") == got.body["id"], f"reply id {rp.get('id')} != "
          f"request id {got.body['id']}")
    check("error" not in rp, f"add reply has an error: {rp}")

    # Binary both ways.
    request(q, "rq-echo", "pyrpc::echo", None, b"\x00\x01thynapse")
    got = serve_one(r, q, "pyrpc::echo")
    check(got.binary == b"\x00\x01thynapse", f"RQST binary: {got.binary!r}")
    m = q.reply("RPLY", "rq-echo")
    check(m.binary == b"espanyht\x01\x00", f"RPLY binary: {m.binary!r}")
    check(m.body.get("payload") == {"bytes": 10}, f"echo reply: {m.body}")

    # The handler's error comes back as the RPLY's error.
    request(q, "rq-bad", "pyrpc::add", {"a": "two", "b": 40})
    serve_one(r, q, "pyrpc::add")
    rp = q.reply("RPLY", "rq-bad").body
    check("a='two'" in str(rp.get("error")), f"handler error reply: {rp}")
    check("payload" not in rp, f"an error reply with a payload: {rp}")

    # Nobody serves the channel: no_responders, at once.
    began = time.monotonic()
    request(q, "rq-none", "pyrpc-nobody::add", {"a": 1, "b": 1})
    expect_error(q, "no_responders", "RQST nobody serves", "rq-none")
    took = time.monotonic() - began
    check(took < 1.0, f"no_responders took {took:.2f} s, not at once")

    # A request left unanswered: timed_out at its deadline; the late RPLY
    # is refused (unknown_delivery) and the responder's slot is free again.
    began = time.monotonic()
    request(q, "rq-slow", "pyrpc::add", {"a": 1, "b": 2}, timeout_ms=300)
    late = r.wait_for("RQST rq-slow", lambda m: m.verb == "RQST")
    expect_error(q, "timed_out", "RQST unanswered", "rq-slow")
    took = time.monotonic() - began
    check(0.3 <= took < 2.0, f"timed_out after {took:.2f} s, not about 0.3 s")
    answer(r, late)
    expect_error(r, "unknown_delivery", "a late RPLY", late.body["id"])
    request(q, "rq-again", "pyrpc::add", {"a": 3, "b": 4})
    serve_one(r, q, "pyrpc::add")
    check(q.reply("RPLY", "rq-again").body.get("payload") == {"sum": 7},
          "a request after the timed-out one")

    q.bye("selftest done")
    r.bye("selftest done")


def selftest(args: argparse.Namespace) -> None:
    ctx = zmq.Context()
    cells: list[Cell] = []
    try:
        run_selftest(ctx, args, cells)
    finally:
        for c in cells:
            c.close()
        ctx.term()  # bounded: every socket has a 1 s linger


# --------------------------------------------------------------------------
# Demo responder
# --------------------------------------------------------------------------


def demo(args: argparse.Namespace) -> None:
    ctx = zmq.Context()
    c = Cell(ctx, args.command, args.token, args.timeout, "demo")
    stop = {"now": False}

    def on_signal(_signum: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        heartbeat = join(c, args.service, args.pattern, args.concurrency)
        print(f"{args.service} ({c.thid}) answers requests on {args.pattern}",
              flush=True)
        next_ping = time.monotonic() + heartbeat
        while not stop["now"]:
            m = c.recv(max(0.0, next_ping - time.monotonic()))
            if m is not None:
                expired = (m.verb == "ERRR" and m.body.get("code") == "not_welcomed") \
                    or (m.verb == "PONG" and m.body.get("welcomed") is False)
                if m.verb == "RQST":
                    answer(c, m)
                    print(f"RQST {m.body.get('channel')} id={m.body.get('id')} "
                          f"answered", flush=True)
                elif expired:
                    print("the transmitter no longer knows us: joining again",
                          flush=True)
                    heartbeat = join(c, args.service, args.pattern, args.concurrency)
                elif m.verb == "GBYE":
                    print(f"transmitter says GBYE: {m.body.get('reason')}", flush=True)
                    return
                elif m.verb == "PING":
                    c.send("PONG", {"ref": m.body["ref"]} if "ref" in m.body else None)
                elif m.verb not in ("PONG", "OKAY"):
                    print(f"{m.verb} {m.raw.decode('utf-8', 'replace')}", flush=True)
            if time.monotonic() >= next_ping:
                c.send("PING", {"ref": "hb"})
                next_ping = time.monotonic() + heartbeat
        c.bye("stopped")
    finally:
        c.close()
        ctx.term()


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, kw in (
        ("--command", {"required": True, "help": "the transmitter's command endpoint"}),
        ("--token", {"help": "PLAIN password (the transmitter's token)"}),
        ("--selftest", {"action": "store_true", "help": "run the interop selftest"}),
        ("--pattern", {"default": "pycalc::*", "help": "demo: pattern served"}),
        ("--service", {"default": "python-calc", "help": "demo: service name"}),
        ("--concurrency", {"type": int, "default": 4,
                           "help": "demo: requests held unanswered at once"}),
        ("--timeout", {"type": float, "default": 10.0,
                       "help": "deadline of each wait, in seconds"}),
    ):
        ap.add_argument(flag, **kw)
    args = ap.parse_args()
    if not args.selftest:
        demo(args)
        return 0

    # A watchdog over the whole run, on top of the deadline of every wait.
    def watchdog(_signum: int, _frame: Any) -> None:
        raise Failure("watchdog: the selftest took too long")

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(args.timeout * 4) + 10)
    try:
        selftest(args)
        print("raw_responder selftest: ok", flush=True)
        return 0
    except Exception as e:  # a Failure says what failed; anything else too
        reason = str(e) if isinstance(e, Failure) else f"{type(e).__name__}: {e}"
        print(f"raw_responder selftest: FAIL: {reason}", flush=True)
        return 1
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
