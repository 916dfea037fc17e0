#!/usr/bin/env bash
# Self-signed CA and a server certificate (for scripts/deploy_local.sh --tls-dir, the SuperLink's
# --ssl-* flags and the stream-tls-cert / stream-tls-key settings).
#
#   scripts/make_certs.sh DIR [NAME ...]
#
# NAMEs are the addresses clients reach the server at (IP addresses or DNS names); default
# 127.0.0.1 and localhost. On two machines: scripts/make_certs.sh certs 192.168.1.10 server.example
set -euo pipefail
DIR=${1:?usage: make_certs.sh DIR [NAME ...]}
shift
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(127.0.0.1 localhost)
SAN=""
for name in "${NAMES[@]}"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then SAN+="IP:$name,"; else SAN+="DNS:$name,"; fi
done
mkdir -p "$DIR" && cd "$DIR"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=hosl-ca" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=${NAMES[0]}" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=%s\n' "${SAN%,}" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile san.ext -out server.pem 2>/dev/null
rm -f server.csr san.ext ca.srl
echo "wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key} for ${NAMES[*]}"
