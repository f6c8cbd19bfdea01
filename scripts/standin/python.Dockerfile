# Stand-in for python:3.11-slim, built from Debian's packages when the real image cannot be
# pulled. Debian 12 ships Python 3.11; like the real image, `python` is on the PATH at
# /usr/local/bin and `python -m venv` works.
ARG BASE=tessera-standin/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && ln -s /usr/bin/python3 /usr/local/bin/python3
ENV LANG=C.UTF-8
LABEL org.tessera.stand-in="python:3.11-slim"
CMD ["python3"]
