#!/usr/bin/env python3
"""Python's `email` package on the messages `cargo bench --bench ingest` wrote
to target/bench-ingest/: parse each, then read what the bridge reads (the
headers it routes by, the text and HTML bodies, the attachments), N times,
on one core. Parsing only: no routing, no storage, no fsync.

    cargo bench --bench ingest && python3 scripts/bench-python-email.py
"""

import email
import email.policy
import pathlib
import sys
import time

FOLDER = pathlib.Path(__file__).resolve().parent.parent / "target" / "bench-ingest"


def read(raw):
    message = email.message_from_bytes(raw, policy=email.policy.default)
    for name in ("from", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references"):
        message.get(name)
    for part in message.walk():
        if part.is_multipart():
            continue
        if part.get_content_disposition() == "attachment":
            part.get_content()
        elif part.get_content_type() in ("text/plain", "text/html"):
            part.get_content()


def main():
    files = sorted(FOLDER.glob("*.eml"))
    if not files:
        sys.exit(f"no messages in {FOLDER}: run `cargo bench --bench ingest` first")
    print(f"Python {sys.version.split()[0]}, email.policy.default")
    for path in files:
        raw = path.read_bytes()
        read(raw)
        rounds = 20 if len(raw) > 1_000_000 else 2_000
        started = time.perf_counter()
        for _ in range(rounds):
            read(raw)
        elapsed = time.perf_counter() - started
        print(f"{path.stem:>18} ({len(raw):>9} bytes): {rounds / elapsed:10.1f} msg/s "
              f"({elapsed / rounds * 1e6:9.1f} µs each)")


if __name__ == "__main__":
    main()
