# Stand-in for redis:7, built from Debian's packages when the real image cannot be pulled
# (Debian 12 ships Redis 7.0). As in the real image, data lives in /data and a server started
# without a configuration file accepts connections from other containers.
ARG BASE=tessera-standin/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
LABEL org.tessera.stand-in="redis:7"
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
