//! Generates the ONNX protobuf types from the vendored `protos/onnx.proto`
//! with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=protos/onnx.proto");
    let fds = protox::compile(["protos/onnx.proto"], ["protos"])?;
    // `bytes::Bytes` for bytes fields: decoding a model from a `Bytes` buffer
    // then slices weight data instead of copying 100 MB.
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
