"""Telling systemd how the daemon is doing (daemon layer).

Under a ``Type=notify`` unit, systemd passes ``$NOTIFY_SOCKET``; the daemon
sends ``READY=1`` once it serves and ``STOPPING=1`` when it stops
(sd_notify(3)).  Without the variable nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(message: str) -> None:
    """Send a state to systemd, if it asked for notifications."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)
