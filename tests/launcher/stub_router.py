"""A stand-in for `tgi-router`, spawned by the launcher in tests.

argv: RECORD_DIR MODE ROUTER_ARGV... with MODE ok | error | die=SECONDS (serve, then exit 5) |
slow=SECONDS (warm up that long before serving) | drain=SECONDS (take that long to exit on
SIGTERM, as a router draining long requests).
Serves `GET /health` -> 200. Writes RECORD_DIR/router.json and, on SIGTERM, router.term.
"""

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tgi_server.launcher.argv import from_argv
from tgi_server.router.config import RouterConfig


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    record_dir, mode, *argv = sys.argv[1:]
    config = from_argv(RouterConfig, argv)
    with open(os.path.join(record_dir, "router.json"), "w") as f:
        json.dump({"pid": os.getpid(), "config": config.__dict__}, f)
    missing = [url for url in config.shard_urls if not os.path.exists(url)]
    if mode == "error" or missing:
        print(f"ERROR: cannot connect to the shards {missing}", file=sys.stderr, flush=True)
        sys.exit(1)

    def on_term(*_) -> None:
        with open(os.path.join(record_dir, "router.term"), "w") as f:
            f.write(str(time.time()))
        if mode.startswith("drain="):
            time.sleep(float(mode.split("=")[1]))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if mode.startswith("slow="):
        print("warming up the shards...", file=sys.stderr, flush=True)
        time.sleep(float(mode.split("=")[1]))
    server = ThreadingHTTPServer((config.hostname, config.port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("warming up the shards... serving", file=sys.stderr, flush=True)
    if mode.startswith("die="):
        time.sleep(float(mode.split("=")[1]))
        sys.exit(5)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
