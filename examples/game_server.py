#!/usr/bin/env python3
"""A tiny game server for roomsched's `local` backend (Python 3 standard library only).

roomsched starts one of these per process, with the same environment variables Hathora
gives a game server: HATHORA_PROCESS_ID, HATHORA_APP_ID, HATHORA_REGION, ... and PORT, the
port to bind. roomsched notices by itself when PORT is bound (the process is then RUNNING),
so this server does not call roomsched back.

Every TCP client (or, with --udp, every datagram) gets one JSON line describing this process.
stdout goes to the process's log file (`log_path`), so lines are flushed at once.

    PORT=7777 python3 examples/game_server.py           # then: nc 127.0.0.1 7777
    PORT=7777 python3 examples/game_server.py --udp     # then: echo hi | nc -u -w1 127.0.0.1 7777
"""

import argparse
import json
import os
import signal
import socket
import sys


def log(message):
    print(f"[game_server {os.getpid()}] {message}", flush=True)


def number(name):
    """An integer variable (0 when unset, e.g. when run by hand)."""
    return int(os.environ.get(name) or 0)


def describe():
    """What roomsched told this process about itself (empty strings when run by hand)."""
    return {
        "process_id": os.environ.get("HATHORA_PROCESS_ID", ""),
        "app_id": os.environ.get("HATHORA_APP_ID", ""),
        "deployment_id": number("HATHORA_DEPLOYMENT_ID"),
        "region": os.environ.get("HATHORA_REGION", ""),
        "rooms_per_process": number("HATHORA_ROOMS_PER_PROCESS"),
        "initial_room_id": os.environ.get("HATHORA_INITIAL_ROOM_ID", ""),
        "initial_room_config": os.environ.get("HATHORA_INITIAL_ROOM_CONFIG", ""),
        "hostname": os.environ.get("HATHORA_HOSTNAME", ""),
        "port": number("PORT"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--udp", action="store_true", help="serve UDP datagrams, not TCP")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    args = parser.parse_args()
    port = number("PORT") or 7777

    # roomsched stops a process with SIGTERM (then SIGKILL after its stop grace): leave the
    # serving loop, close the socket and exit 0. Further SIGTERMs are ignored, so that a
    # repeated one cannot cut the clean shutdown short.
    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)

    answer = (json.dumps(describe()) + "\n").encode()
    kind = socket.SOCK_DGRAM if args.udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, port))
        if not args.udp:
            sock.listen()
        # roomsched now sees the port bound (TCP: listening) and reports the process RUNNING.
        info = describe()
        log(
            f"ready: {'udp' if args.udp else 'tcp'} port {port}, process {info['process_id']}, "
            f"app {info['app_id']}, region {info['region']}, "
            f"first room {info['initial_room_id']!r} with config {info['initial_room_config']!r}"
        )
        try:
            while True:
                if args.udp:
                    _, client = sock.recvfrom(65536)
                    sock.sendto(answer, client)
                else:
                    conn, client = sock.accept()
                    with conn:
                        conn.sendall(answer)
                log(f"answered {client[0]}:{client[1]}")
        except SystemExit:
            log("SIGTERM received, shutting down")
            raise


if __name__ == "__main__":
    main()
