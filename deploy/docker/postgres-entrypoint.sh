#!/bin/sh
# First start: a cluster whose one role, homecell, signs in with the
# password in $PASSWORD_FILE (scram-sha-256, from any address of the
# compose network), owning the database homecell_cp. Later starts keep it.
set -eu
umask 077
bin=/usr/lib/postgresql/15/bin
data=/var/lib/homecell-postgres/data
if [ ! -s "$data/PG_VERSION" ]; then
  pw="$(cat "$PASSWORD_FILE")"
  trap 'rm -f /tmp/pw' EXIT
  printf '%s\n' "$pw" >/tmp/pw
  "$bin/initdb" -D "$data" -U homecell --pwfile=/tmp/pw --auth-local=scram-sha-256 \
    --auth-host=scram-sha-256 -E UTF8 >/dev/null
  rm -f /tmp/pw
  echo "host all all 0.0.0.0/0 scram-sha-256" >>"$data/pg_hba.conf"
  "$bin/pg_ctl" -D "$data" -o "-c listen_addresses=''" -w start >/dev/null
  PGPASSWORD="$pw" "$bin/createdb" -h /run/postgresql -U homecell homecell_cp
  "$bin/pg_ctl" -D "$data" -w stop >/dev/null
fi
exec "$bin/postgres" -D "$data" -c listen_addresses='*'
