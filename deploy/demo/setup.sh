#!/bin/sh
# One-shot setup of the local Docker demo (`docker compose run --rm setup`): the federation's
# certificates, two sites' keys, a small synthetic cohort and every config, into /demo (./demo on
# the host). Existing certificates, keys and data are kept; configs are rewritten.
set -eu
D=/demo
mkdir -p "$D/server" "$D/server-state"
[ -e "$D/server/certs/ca.crt" ] || biofp certs init --out "$D/server/certs" --server-name superlink
cp /opt/biofp/deploy/demo/server.toml "$D/server/server.toml"
[ -d "$D/cohort/site_01" ] || biofp data synth --out "$D/cohort" --sites 2 --subjects-per-site 8 \
    --minutes 2 --seed 0
for site in north south; do
    mkdir -p "$D/$site/federation"
    [ -e "$D/$site/federation/$site.key" ] || biofp certs node --out "$D/$site/federation" --name "$site"
    cp "$D/server/certs/ca.crt" "$D/$site/federation/ca.crt"
    sed "s/@SITE@/$site/g" /opt/biofp/deploy/demo/site.toml > "$D/$site/site.toml"
done
biofp server app --out "$D/app"
printf 'num-rounds = 3\nmin-sites = 2\nout-dir = "demo"\n' > "$D/run.toml"
FLWR_HOME="$D/coordinator" biofp server connect --config "$D/server/server.toml" --default
chown -R 10001:10001 "$D"
echo "demo ready in ./demo: docker compose up -d superlink, register the keys, up the sites"
