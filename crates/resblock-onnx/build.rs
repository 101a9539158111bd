//! Generates the ONNX message types from the official `proto/onnx.proto` with `protox`
//! (pure Rust, no `protoc`) and `prost-build`; the result is `$OUT_DIR/onnx.rs`.

fn main() {
    let proto = "proto/onnx.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("cannot compile {proto}: {e}"),
    };
    if let Err(e) = prost_build::Config::new().compile_fds(fds) {
        panic!("prost-build cannot generate the ONNX types: {e}");
    }
}
