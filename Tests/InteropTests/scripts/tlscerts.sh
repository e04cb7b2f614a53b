#!/bin/sh
# Test credentials for the TLS interop tests, made with openssl: a CA, and in DIR
#   server/   ca-cert.pem server-cert.pem server-key.pem (for localhost and 127.0.0.1)
#   client/   ca-cert.pem client-cert.pem client-key.pem (signed by the CA)
#   anon/     ca-cert.pem only (trusts the server, has no certificate of its own)
#   foreign/  ca-cert.pem, and a client certificate signed by another CA
#   revoked/  ca-cert.pem, and a client certificate the CA signed and then revoked
#             (server/ca-crl.pem lists it)
#   wrongca/  ca-cert.pem of the other CA only (a client that must refuse the server)
#   keys.psk  two pre-shared keys (alice, bob), psktool's format; wrong.psk another key for alice
# Usage: tlscerts.sh DIR
set -eu
d=$1
mkdir -p "$d/server" "$d/client" "$d/anon" "$d/foreign" "$d/revoked" "$d/work"
w=$d/work
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() {
    key "$w/$1-key.pem"
    openssl req -x509 -new -key "$w/$1-key.pem" -out "$w/$1-cert.pem" -days 7 -subj "/CN=thinbd test $1" 2>/dev/null
}
signed() { # NAME CA SUBJECT EXTENSIONS OUTDIR PREFIX
    key "$5/$6-key.pem"
    openssl req -new -key "$5/$6-key.pem" -out "$w/$1.csr" -subj "$3" 2>/dev/null
    printf '%s\n' "$4" > "$w/$1.ext"
    openssl x509 -req -in "$w/$1.csr" -CA "$w/$2-cert.pem" -CAkey "$w/$2-key.pem" -CAcreateserial \
        -out "$5/$6-cert.pem" -days 7 -extfile "$w/$1.ext" 2>/dev/null
}
ca ca
ca other
signed server ca "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth" "$d/server" server
signed client ca "/CN=client" "extendedKeyUsage=clientAuth" "$d/client" client
signed foreign other "/CN=foreign" "extendedKeyUsage=clientAuth" "$d/foreign" client
signed revoked ca "/CN=revoked" "extendedKeyUsage=clientAuth" "$d/revoked" client
# A CRL from the CA that revokes the last one (openssl ca keeps its state in files).
: > "$w/index.txt"
printf '1000\n' > "$w/crlnumber"
cat > "$w/ca.cnf" <<CONF
[ca]
default_ca = test
[test]
database = $w/index.txt
crlnumber = $w/crlnumber
default_md = sha256
default_crl_days = 7
CONF
openssl ca -config "$w/ca.cnf" -keyfile "$w/ca-key.pem" -cert "$w/ca-cert.pem" -revoke "$d/revoked/client-cert.pem" 2>/dev/null
openssl ca -config "$w/ca.cnf" -keyfile "$w/ca-key.pem" -cert "$w/ca-cert.pem" -gencrl -out "$d/server/ca-crl.pem" 2>/dev/null
for dir in server client anon foreign revoked; do cp "$w/ca-cert.pem" "$d/$dir/ca-cert.pem"; done
# wrongca/: trusts only the other CA (so refuses the server's certificate).
mkdir -p "$d/wrongca"
cp "$w/other-cert.pem" "$d/wrongca/ca-cert.pem"
hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
printf 'alice:%s\nbob:%s\n' "$(hex)" "$(hex)" > "$d/keys.psk"
printf 'alice:%s\n' "$(hex)" > "$d/wrong.psk"
chmod 600 "$d/keys.psk" "$d/wrong.psk" "$d"/*/*-key.pem
