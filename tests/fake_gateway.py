"""A gateway process over `FakeEngine` (no model), for tests that need several gateways.

    python -m tests.fake_gateway FEEDBACK_DB [--record-completions]

Listens on a free 127.0.0.1 port and prints `PORT <n>` once bound; SIGTERM stops it, and the
tests SIGKILL it to check what survives.
"""

from __future__ import annotations

import socket
import sys

from prometheus_client import CollectorRegistry


def main(argv: list[str]) -> None:
    from tests.serve_helpers import FakeEngine
    from toolkit.feedback.store import FeedbackStore
    from toolkit.monitoring.metrics import GatewayMetrics
    from toolkit.serve import ServeSettings
    from toolkit.serve.app import build_app
    from toolkit.serve.server import make_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = ServeSettings(model="fake", host="127.0.0.1", port=port, feedback_db=argv[0],
                             record_completions="--record-completions" in argv[1:])
    app = build_app(settings, FakeEngine(), GatewayMetrics(CollectorRegistry()),
                    FeedbackStore(settings.feedback_db))
    print(f"PORT {port}", flush=True)
    make_server(app, settings, log_level="warning").run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
