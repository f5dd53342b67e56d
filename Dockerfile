# tokenserver in a container, installed from the same Debian package as on a host.
#   docker build -t tokenserver .
#   docker run -p 8000:8000 -v tokenserver:/var/lib/tokenserver tokenserver
# Configuration by environment (TOKENSERVER_*, SYNC_*) or a file mounted over
# /etc/tokenserver/tokenserver.toml; one-off commands: docker run … tokenserver node list

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cp "$(scripts/package-deb)" /tokenserver.deb

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends adduser ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /tokenserver.deb /tmp/tokenserver.deb
RUN dpkg -i /tmp/tokenserver.deb && rm /tmp/tokenserver.deb
USER tokenserver
WORKDIR /var/lib/tokenserver
# The public listener on every interface of the container; the internal one stays on its loopback
# (reach it with `docker exec`, or set TOKENSERVER_INTERNAL__HOST and the keys deliberately).
ENV SYNC_HOST=0.0.0.0
VOLUME /var/lib/tokenserver
EXPOSE 8000
# The internal heartbeat checks the store of every family that is on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD curl -fsS http://127.0.0.1:8001/__heartbeat__ >/dev/null || exit 1
ENTRYPOINT ["/usr/bin/tokenserver", "--config", "/etc/tokenserver/tokenserver.toml"]
CMD ["serve"]
