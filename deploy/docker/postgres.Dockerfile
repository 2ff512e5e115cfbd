# PostgreSQL for the compose deployment's shared control-plane store
# (deploy/compose.postgres.yaml), built on the same base as the Homecell
# images (no image needs pulling). Production runs the PostgreSQL its
# operators already run, replicated; this one is a single server.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# A fixed uid, so the compose file can hand the password file to it.
RUN groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --no-create-home postgres \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/homecell-postgres /run/postgresql \
 && chown postgres:postgres /var/lib/homecell-postgres /run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
VOLUME /var/lib/homecell-postgres
EXPOSE 5432
HEALTHCHECK --interval=2s --timeout=4s --start-period=30s --retries=15 \
  CMD ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1", "-q"]
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
