# wsbridge as a container image: built in a Rust image, run from a distroless one (glibc, no
# shell, no package manager; ~30 MB with the binary). See examples/deploy/README.md.
#
#   docker build -t wsbridge .
#   docker run -p 8080:8080 -e WSBRIDGE__REDIS__URL=redis://redis:6379 wsbridge
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# src/api.rs embeds the OpenAPI document (include_str!), served at GET /openapi.json.
COPY docs/openapi.json ./docs/openapi.json
COPY examples ./examples
RUN cargo build --release --locked --bin wsbridge

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/wsbridge /usr/local/bin/wsbridge
COPY config/wsbridge.toml /etc/wsbridge/wsbridge.toml
# In a container both listeners must accept connections from outside the container; keep the
# backend API (8081) off the public network (a private Service, api.keys, a NetworkPolicy).
ENV WSBRIDGE__SERVER__LISTEN=0.0.0.0:8080 \
    WSBRIDGE__SERVER__API_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
USER nonroot
ENTRYPOINT ["/usr/local/bin/wsbridge", "--config", "/etc/wsbridge/wsbridge.toml"]
