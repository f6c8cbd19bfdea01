# Stand-in for postgres:16, built from Debian's packages when the real image cannot be pulled.
# Debian 12 ships PostgreSQL 15, the release the test suite runs against. The entrypoint honours
# what the compose file uses of the real image: POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB
# on first start, data in /var/lib/postgresql/data, password logins over the network, and
# pg_isready on the PATH.
ARG BASE=tessera-standin/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 0700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
LABEL org.tessera.stand-in="postgres:16"
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
