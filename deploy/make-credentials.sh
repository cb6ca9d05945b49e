#!/usr/bin/env sh
# Certificates and SuperNode keys for a deployed federation, made once and kept (idempotent).
#
#   deploy/make-credentials.sh OUT [NUM_NODES] [SAN ...]
#
# OUT/ca.crt, OUT/ca.key          the federation's own CA (keep ca.key off the server if you can)
# OUT/server.crt, OUT/server.key  the SuperLink's certificate, signed by the CA; its SANs are
#                                 DNS:superlink, DNS:localhost, IP:127.0.0.1 plus every SAN given
#                                 ("DNS:fl.example.org", "IP:10.0.0.5"): every address a node or
#                                 the CLI dials must be named, or TLS fails
# OUT/node<i>, OUT/node<i>.pub    SuperNode i's ECDSA P-384 key pair (Flower's node authentication
#                                 takes EC OpenSSH keys only), i = 0 .. NUM_NODES-1
#
# Existing files are kept, so a second run (a second `docker compose up`) changes nothing and a
# key already registered stays the one registered. Delete a file to make it anew (key rotation:
# see README "Deployment"). Needs openssl and ssh-keygen.
set -eu

out="${1:?usage: make-credentials.sh OUT [NUM_NODES] [SAN ...]}"
nodes="${2:-3}"
[ $# -ge 2 ] && shift 2 || shift $#
days="${CERT_DAYS:-825}"
mkdir -p "$out"
umask 077

if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$days" -subj "/CN=fedsto federation CA" \
        -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
    rm -f "$out/server.crt"  # a new CA invalidates the old server certificate
    echo "made $out/ca.crt"
fi

if [ ! -s "$out/server.key" ] || [ ! -s "$out/server.crt" ]; then
    sans="DNS:superlink,DNS:localhost,IP:127.0.0.1"
    for san in "$@"; do sans="$sans,$san"; done
    ext="$(mktemp)"
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$sans" > "$ext"
    openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=superlink" -keyout "$out/server.key" \
        -out "$out/server.csr" 2>/dev/null
    openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
        -days "$days" -sha256 -extfile "$ext" -out "$out/server.crt" 2>/dev/null
    rm -f "$out/server.csr" "$ext"
    echo "made $out/server.crt ($sans)"
fi

i=0
while [ "$i" -lt "$nodes" ]; do
    if [ ! -s "$out/node$i" ]; then
        rm -f "$out/node$i.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsto-node$i" -f "$out/node$i"
        echo "made $out/node$i.pub"
    fi
    i=$((i + 1))
done
# Certificates and public keys are for reading; private keys stay 0600.
chmod 644 "$out/ca.crt" "$out/server.crt" "$out"/node*.pub 2>/dev/null || true
