# The region router (Pingora). Built by deploy/build-images from a release
# binary in the build context.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# Public HTTP and the admin listener (/healthz, /ready, /metrics).
ARG HTTP_PORT=8080
ARG ADMIN_PORT=8081
# tini forwards SIGTERM and reaps; the base deploy/base-image makes has it.
RUN if ! command -v tini >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends tini ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10001 --user-group --no-create-home homecell \
 && mkdir -p /var/lib/homecell /etc/homecell/pki \
 && chown homecell:homecell /var/lib/homecell /etc/homecell/pki
COPY region-router /usr/local/bin/region-router
# Every setting is a HOMECELL_ROUTER_* variable (or a TOML file at
# HOMECELL_CONFIG); these are the ones that depend on the image.
ENV HOMECELL_ROUTER_LISTEN=0.0.0.0:${HTTP_PORT} \
    HOMECELL_ROUTER_ADMIN_LISTEN=0.0.0.0:${ADMIN_PORT} \
    HOMECELL_ROUTER_DATA_DIR=/var/lib/homecell \
    HOMECELL_ROUTER_LOG_FORMAT=json
USER homecell
WORKDIR /var/lib/homecell
VOLUME /var/lib/homecell
EXPOSE ${HTTP_PORT} ${ADMIN_PORT}
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 \
  CMD ["region-router", "--healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "region-router"]
