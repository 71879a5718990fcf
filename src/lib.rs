//! cresnet-opt: an ONNX-in, ONNX-out compressor for ResNet-style CNNs.
//!
//! Load ([`io`]) → IR ([`ir`]) → validate ([`validate`]) → passes
//! ([`passes`], the code in the top-level `passes/` folder) → save.
//! [`stats`] counts params and MACs, [`runner`] runs models with tract,
//! [`evaluate`] measures accuracy on image folders ([`data`]), [`refit`]
//! holds the calibrated least-squares recovery and [`train`] the
//! distillation engine. The command line lives in the binary (`src/cli`).
pub mod config;
pub mod data;
pub mod error;
pub mod evaluate;
/// Seeded test models (the `make-fixture` binary, tests, benchmarks).
pub mod fixture;
pub mod io;
pub mod ir;
pub mod onnx;
#[path = "../passes/mod.rs"]
pub mod passes;
pub mod progress;
pub mod refit;
pub mod rng;
pub mod runner;
pub mod shape;
pub mod stats;
pub mod train;
pub mod validate;

pub use error::{Error, Result};
