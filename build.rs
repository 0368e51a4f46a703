//! Compiles `proto/bitnet.proto` (with protox, no `protoc` needed) into the gRPC service and
//! client of `bitnet serve`, and its descriptor set for server reflection.

fn main() {
    println!("cargo:rerun-if-changed=proto/bitnet.proto");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "server")]
    grpc();
}

#[cfg(feature = "server")]
fn grpc() {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let files = protox::compile(["proto/bitnet.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/bitnet.proto: {e}"));
    std::fs::write(
        out.join("bitnet_descriptor.bin"),
        prost::Message::encode_to_vec(&files),
    )
    .expect("writing the descriptor set");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(files)
        .unwrap_or_else(|e| panic!("generating the gRPC code: {e}"));
}
