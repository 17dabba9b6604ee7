# Ferry agent image: `docker build -t ferry:latest .` at the repository root.
#
# Stage 1 builds `ferry` with the eBPF object embedded, with the same toolchain as
# `cargo xtask setup` (shared/notes/toolchain.md): Debian 12's rustc-web (a
# complete toolchain with library sources for -Z build-std=core), linked into
# rustup as `bpf-web` because aya-build runs `rustup run bpf-web cargo build`, and
# bpf-linker built against Debian's LLVM 22.
FROM debian:bookworm AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl build-essential pkg-config \
      rustc-web cargo-web rust-web-src \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev \
 && rm -rf /var/lib/apt/lists/*
# rustup only as a toolchain multiplexer: no toolchain is downloaded; Debian's
# compiler in /usr is linked in and made the default.
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal --default-toolchain none --no-modify-path \
 && rustup toolchain link bpf-web /usr \
 && rustup default bpf-web
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
# RUSTC_BOOTSTRAP=1 comes from .cargo/config.toml (build-std on a stable rustc).
RUN cargo build --release --locked -p ferry \
 && install -D -m 0755 target/release/ferry /out/ferry

# Stage 2: the binary alone. It needs no shell, no iproute2, no bpftool: it
# talks netlink and bpf(2) itself.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ferry /usr/local/bin/ferry
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["agent"]
