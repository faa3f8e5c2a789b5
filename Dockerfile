# rabbitgate: the gateway alone. Certificates, policies and the config file are
# mounted at run time (see compose.yaml); nothing secret is baked in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Build from a copy of the sources that is removed afterwards: only the
# installed package stays in the image. (README.md is left out on purpose:
# setuptools only warns, and the image needs no long description.)
COPY pyproject.toml /src/
COPY gateway /src/gateway
COPY anomaly /src/anomaly
RUN pip install /src && rm -rf /src

# An unprivileged user. /app/certs is created owned by it so that a named
# volume mounted there starts writable (`rabbitgate certs` writes to certs/).
# Likewise /var/lib/rabbitgate/anomaly, the anomaly detector's data (model, alerts).
RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin rabbitgate \
    && mkdir -p /app/certs /app/policies /etc/rabbitgate /var/lib/rabbitgate/anomaly \
    && chown rabbitgate:rabbitgate /app /app/certs /var/lib/rabbitgate /var/lib/rabbitgate/anomaly
COPY deploy/gateway.yaml /etc/rabbitgate/gateway.yaml

WORKDIR /app
USER rabbitgate

# 8443: wss:// for clients; 8444: Server-Sent Events (https://); 9090: the admin
# endpoints (/metrics, /readyz), for the internal network only.
EXPOSE 8443 8444 9090
ENTRYPOINT ["rabbitgate"]
CMD ["serve", "--config", "/etc/rabbitgate/gateway.yaml"]
