# A regional cell. Built by deploy/build-images from a release binary in the
# build context (no compiler in the image).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The internal API (mTLS) and the admin listener (/healthz, /ready, /metrics).
ARG API_PORT=9443
ARG ADMIN_PORT=9080
# tini forwards SIGTERM and reaps; the base deploy/base-image makes has it.
RUN if ! command -v tini >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends tini ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10001 --user-group --no-create-home homecell \
 && mkdir -p /var/lib/homecell /etc/homecell/pki \
 && chown homecell:homecell /var/lib/homecell /etc/homecell/pki
COPY cell /usr/local/bin/cell
# Every setting is a HOMECELL_CELL_* variable (or a TOML file at
# HOMECELL_CONFIG); these are the ones that depend on the image.
ENV HOMECELL_CELL_LISTEN=0.0.0.0:${API_PORT} \
    HOMECELL_CELL_ADMIN_LISTEN=0.0.0.0:${ADMIN_PORT} \
    HOMECELL_CELL_DATA_DIR=/var/lib/homecell \
    HOMECELL_CELL_LOG_FORMAT=json
USER homecell
WORKDIR /var/lib/homecell
VOLUME /var/lib/homecell
EXPOSE ${API_PORT} ${ADMIN_PORT}
HEALTHCHECK --interval=5s --timeout=4s --start-period=60s --retries=3 \
  CMD ["cell", "--healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "cell"]
