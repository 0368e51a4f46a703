# bitnet-inference server image: `docker build -t bitnet-inference .`
# Run: `docker run -p 8080:8080 bitnet-inference` (serves the bundled default model), or mount a
# model directory and pass `--model /models/NAME`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --no-default-features --features server \
    && strip -o /bitnet target/release/bitnet

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 bitnet
COPY --from=build /bitnet /usr/local/bin/bitnet
COPY models /models
USER 10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/bitnet", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model", "/models/kjv-fortunes"]
