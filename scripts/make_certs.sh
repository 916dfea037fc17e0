#!/usr/bin/env bash
# Self-signed CA and a server certificate for 127.0.0.1 / localhost (for scripts/deploy_local.sh
# --tls-dir and the stream-tls-cert / stream-tls-key settings). Usage: scripts/make_certs.sh DIR
set -euo pipefail
DIR=${1:?usage: make_certs.sh DIR}
mkdir -p "$DIR" && cd "$DIR"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=hosl-ca" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile san.ext -out server.pem 2>/dev/null
rm -f server.csr san.ext ca.srl
echo "wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key}"
