//! The library's error type. Every failure a user can cause (bad files, bad
//! models, bad options) is a variant here; the library never panics on input.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is empty (0 bytes): not an ONNX model")]
    EmptyFile { path: PathBuf },
    #[error("{what} is not a valid ONNX protobuf (truncated, corrupt or another format)")]
    Decode {
        what: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{what} decodes as protobuf but is not an ONNX model: {reason}")]
    NotOnnx { what: String, reason: String },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("after pass `{pass}`")]
    AfterPass {
        pass: String,
        #[source]
        source: Box<Error>,
    },
    #[error("shape inference failed at node `{node}` ({op}): {reason}")]
    Shape { node: String, op: String, reason: String },
    #[error("bad pipeline configuration: {0}")]
    Config(String),
    #[error("bad data: {0}")]
    Data(String),
    #[error("tract: {0}")]
    Tract(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("pass `{pass}` failed: {reason}")]
    Pass { pass: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
    pub fn tensor(name: &str, reason: impl Into<String>) -> Self {
        Error::BadTensor { name: name.to_string(), reason: reason.into() }
    }
}
