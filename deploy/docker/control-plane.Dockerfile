# The control plane: server and operator CLI in one binary. Built by
# deploy/build-images from a release binary in the build context.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# gRPC (mTLS) and the admin listener (/healthz, /ready, /metrics).
ARG GRPC_PORT=7443
ARG ADMIN_PORT=7080
# tini forwards SIGTERM and reaps; the base deploy/base-image makes has it.
RUN if ! command -v tini >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends tini ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10001 --user-group --no-create-home homecell \
 && mkdir -p /var/lib/homecell /etc/homecell/pki \
 && chown homecell:homecell /var/lib/homecell /etc/homecell/pki
COPY control-plane /usr/local/bin/control-plane
# Every server setting is a HOMECELL_CP_* variable (or a TOML file at
# HOMECELL_CONFIG); the CLI reads HOMECELL_CONTROL_PLANE and HOMECELL_PKI_DIR.
ENV HOMECELL_CP_LISTEN=0.0.0.0:${GRPC_PORT} \
    HOMECELL_CP_ADMIN_LISTEN=0.0.0.0:${ADMIN_PORT} \
    HOMECELL_CP_DATA_DIR=/var/lib/homecell \
    HOMECELL_CP_LOG_FORMAT=json
USER homecell
WORKDIR /var/lib/homecell
VOLUME /var/lib/homecell
EXPOSE ${GRPC_PORT} ${ADMIN_PORT}
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 \
  CMD ["control-plane", "serve", "--healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "control-plane"]
CMD ["serve"]
