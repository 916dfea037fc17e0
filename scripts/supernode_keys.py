"""One P-384 key pair per SuperNode in OpenSSH format, what Flower's SuperNode authentication reads.

python scripts/supernode_keys.py KEYS_DIR N   # writes supernode-<i> (0600) and supernode-<i>.pub
"""

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec

from fl_app.checkpoint import write_private_file


def main(keys: Path, nodes: int) -> None:
    keys.mkdir(parents=True, exist_ok=True)
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
        write_private_file(keys / f"supernode-{i}", private)
        public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
        (keys / f"supernode-{i}.pub").write_bytes(public)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
