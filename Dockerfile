# calico-node in Rust: one image with calico-node and calicoctl.
# Build: docker build -t calico-node-rs .   (not exercised on the development machines,
# which have no Docker engine; see README "Status").
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 nftables ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/calico-node /src/target/release/calicoctl /usr/bin/
ENTRYPOINT ["/usr/bin/calico-node"]
