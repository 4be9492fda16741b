#!/usr/bin/env bash
# Makes sure the services yunqi's tests may talk to are up on this machine: PostgreSQL on
# 127.0.0.1:5432 and NATS with JetStream on 127.0.0.1:4222, and that psql (the client the pg
# endpoint's tests use) is installed. Installs from Debian's packages what is missing, starts
# what is stopped. Idempotent.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 50); do port_open "$1" && return 0; sleep 0.2; done
  echo "services: $2 did not come up on port $1" >&2
  return 1
}

apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "services: $* missing and apt-get unavailable; install it by hand" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
  wait_port 5432 PostgreSQL
fi

if ! port_open 4222; then
  if [ ! -x /usr/sbin/nats-server ]; then apt_install nats-server; fi
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server
  wait_port 4222 "NATS"
fi
# The pg endpoint's tests drive it with psql, a real PostgreSQL client.
if ! command -v psql >/dev/null; then apt_install postgresql-client; fi
# The TLS test makes a self-signed certificate with openssl.
if ! command -v openssl >/dev/null; then apt_install openssl; fi
echo "services: PostgreSQL :5432 and NATS :4222 are up; psql and openssl are installed"
