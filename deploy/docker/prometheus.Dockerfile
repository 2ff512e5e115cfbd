# Prometheus for the compose deployment, from Debian's package on the same
# base as the Homecell images (no image needs pulling), with the scrape
# config and alert rules of deploy/prometheus baked in.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/homecell-prometheus /etc/homecell-prometheus \
 && chown prometheus:prometheus /var/lib/homecell-prometheus
COPY prometheus.compose.yml /etc/homecell-prometheus/prometheus.yml
COPY alerts.yml /etc/homecell-prometheus/alerts.yml
USER prometheus
VOLUME /var/lib/homecell-prometheus
EXPOSE 9090
# /-/ready with bash alone (the image carries no curl).
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/ready HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/prometheus", \
  "--config.file=/etc/homecell-prometheus/prometheus.yml", \
  "--storage.tsdb.path=/var/lib/homecell-prometheus", \
  "--storage.tsdb.retention.time=15d", \
  "--web.listen-address=0.0.0.0:9090"]
