//! cresnet-opt: an ONNX-in, ONNX-out compressor for ResNet-style CNNs.
//!
//! Load ([`io`]) → IR ([`ir`]) → validate ([`validate`]) → passes
//! ([`passes`]) → save. [`stats`] counts params and MACs, [`runner`] runs
//! models with tract and [`evaluate`] measures accuracy on image folders.
pub mod cli;
pub mod config;
pub mod error;
pub mod evaluate;
pub mod fixture;
pub mod imagedata;
pub mod io;
pub mod ir;
pub mod onnx;
pub mod passes;
pub mod reconstruct;
pub mod recover;
pub mod runner;
pub mod shape;
pub mod stats;
pub mod train;
pub mod validate;

pub use error::{Error, Result};
