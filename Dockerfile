# One image for every role: the command chooses it (python -m write_service | write_service.migrate
# | relay | read_service | write_service.saga | payment_provider). The code runs from /app, the source tree, with the package generated
# from protos/ at build time.

# Runtime dependencies, exactly as requirements.lock pins and hashes them (the lock CI
# tests with), so this layer changes only with the lock.
FROM python:3.11-slim AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock

# The codegen tools stay in this stage; only their output reaches the final image. The codegen lock
# is resolved together with the runtime lock, so protobuf here is the version the runtime imports.
FROM deps AS codegen
COPY requirements-codegen.lock ./
RUN pip install --require-hashes --no-deps -r requirements-codegen.lock
COPY protos/ protos/
COPY scripts/gen_protos.py scripts/gen_protos.py
RUN mkdir -p /build/out && python scripts/gen_protos.py --out /build/out

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid tessera --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tessera
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root . .
COPY --from=codegen --chown=root:root /build/out/tessera /app/tessera
# Fail the build, not the first start, if the generated code does not load on this runtime.
RUN python -c "import importlib, pkgutil, tessera; [importlib.import_module(m.name) for m in pkgutil.walk_packages(tessera.__path__, 'tessera.')]"
# The payment provider's state directory: a named volume mounted here starts with this owner.
RUN mkdir -p /var/lib/tessera/payment-provider && chown -R tessera:tessera /var/lib/tessera
USER tessera:tessera
EXPOSE 50051 50052 50061 50070
CMD ["python", "-m", "write_service"]
