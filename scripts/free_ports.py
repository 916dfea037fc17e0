"""Print N TCP ports of 127.0.0.1 that are free now, held at once so that they differ (default 1).

python scripts/free_ports.py N
"""

import socket
import sys

held = [socket.socket() for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1)]
for sock in held:
    sock.bind(("127.0.0.1", 0))
print(" ".join(str(sock.getsockname()[1]) for sock in held))
