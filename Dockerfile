# usersvc: a slim, non-root image that serves gRPC on 0.0.0.0:50051.
#
# The wheels are built on the host, so the build itself needs no network and no compiler:
#   make image            (pip wheel --wheel-dir dist/wheels ./generated . && docker build -t usersvc .)
# The base is any Debian-like image with python3 and its venv module, of the same Python
# minor version as the host that built the wheels (3.11 for the default).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
# Marks the build stage, so that tests can remove what the classic builder leaves of it.
LABEL usersvc.stage=install
COPY dist/wheels/ /tmp/wheels/
# A virtual environment from the wheels alone; pip leaves with the build stage.
RUN python3 -m venv /opt/usersvc \
    && /opt/usersvc/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels usersvc \
    && /opt/usersvc/bin/pip uninstall --yes pip \
    && /opt/usersvc/bin/python -m compileall -q /opt/usersvc/lib

FROM ${BASE_IMAGE}
# The only writable places a read-only root needs: the data directory (SQLite and development
# secrets; a volume in production) and /tmp.
RUN mkdir -p /var/lib/usersvc && chown 10001:10001 /var/lib/usersvc
COPY --from=install /opt/usersvc /opt/usersvc
ENV PATH=/opt/usersvc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    USERSVC_LISTEN_ADDRESS=0.0.0.0:50051 \
    USERSVC_DATA_DIR=/var/lib/usersvc
USER 10001:10001
WORKDIR /var/lib/usersvc
EXPOSE 50051 9090
# The server drains (health NOT_SERVING), then gives in-flight calls their grace, on SIGTERM.
STOPSIGNAL SIGTERM
# Where native gRPC probes are missing (plain Docker, Compose): the same Health/Check call.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["usersvc", "healthcheck", "--service", "userservice.v1.UserService"]
ENTRYPOINT ["usersvc"]
CMD ["serve"]
