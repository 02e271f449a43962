# prefsync as a static binary in an empty image, e.g. for `prefsync listen`.
#
#   docker build -t prefsync .
#   docker run -d --name prefsync-listen -p 127.0.0.1:8788:8788 \
#     -v /srv/prefsync:/data \
#     -e PREFINERY_API_KEY_FILE=/data/api-key \
#     prefsync listen --beta a9b8c7de \
#       --mirror /data/mirror.sqlite --secret-file /data/webhook-secret --bind 0.0.0.0:8788
#
# Stage 1: Alpine's Rust builds against musl, so the binary is static
# (SQLite is bundled and compiled in; ring's C and assembly build with
# musl-dev; TLS roots are compiled in by reqwest's rustls, so the final
# image needs no CA files).
# The toolchain the tests and CI run on (1.95).
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY samples ./samples
RUN cargo build --release --locked --bin prefsync \
 && strip target/release/prefsync \
 && ! ldd target/release/prefsync 2>/dev/null | grep -q '=>' \
 && mkdir -m 1777 /scratch-tmp

# Stage 2: nothing but the binary, run as an unprivileged user.
FROM scratch
COPY --from=build /src/target/release/prefsync /prefsync
# A dry run's scratch checkpoint and a spooled standard input need a
# temporary directory; an empty image has none.
COPY --from=build /scratch-tmp /tmp
USER 65534:65534
WORKDIR /data
EXPOSE 8788
ENTRYPOINT ["/prefsync"]
CMD ["--help"]
