"""The raw kombu side of ``bench/events.py``: count the messages of one queue.

``python -m bench.apps.raw_consumer --broker URL --queue NAME --expect N --result FILE``
consumes ``NAME`` on one channel (manual acks, ``--prefetch`` unacked), keeps
each event id, and appends two JSON lines to ``FILE``: ``{"done_at": <epoch>}``
when the ``N``-th message arrived, then, after ``--settle`` more seconds of
consuming (to catch extra copies), ``{"count": ..., "distinct": ...}``. Then it
idles until terminated, so the benchmark can still read its CPU time.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer


class Tally:
    """Counts messages and distinct event ids; notes when the expected count arrived."""

    def __init__(self, expect: int, result: Path) -> None:
        self.expect = expect
        self.result = result
        self.count = 0
        self.ids: set[str] = set()
        self.done_at: float | None = None

    def on_message(self, body: Any, message: Message) -> None:
        self.count += 1
        self.ids.add(str(body["data"]["id"]))
        message.ack()
        if self.count == self.expect:
            self.done_at = time.time()
            self.write({"done_at": self.done_at})

    def write(self, record: dict[str, Any]) -> None:
        with self.result.open("a") as out:
            out.write(json.dumps(record) + "\n")


def consume(args: argparse.Namespace, tally: Tally) -> None:
    """Consume until ``--settle`` seconds after the expected count, or ``--timeout``."""
    deadline = time.time() + args.timeout
    with Connection(args.broker) as conn:
        channel = conn.channel()
        queue = Queue(args.queue, no_declare=True)
        consumer = Consumer(
            channel,
            queues=[queue],
            callbacks=[tally.on_message],
            accept=["json"],
            prefetch_count=args.prefetch,
            auto_declare=False,
        )
        with consumer:
            while time.time() < deadline:
                if tally.done_at is not None and time.time() > tally.done_at + args.settle:
                    break
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    continue


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    tally = Tally(args.expect, args.result)
    consume(args, tally)
    tally.write({"count": tally.count, "distinct": len(tally.ids)})
    signal.pause()  # until the benchmark stops us (it reads our CPU time first)


if __name__ == "__main__":
    main()
