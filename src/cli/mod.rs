//! The command line: `cresnet-opt IN -o OUT --passes …` (optimize) plus the
//! `stats`, `check`, `bench` and `pipelines` subcommands, one module each. Errors
//! print as one `error: …` line with the cause chain and exit with code 2.
mod bench;
mod check;
mod optimize;
mod pipelines;
mod progress;
mod retarget;
mod stats;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "cresnet-opt",
    version,
    about = "Compress ResNet-style ONNX models: BN folding, coupled channel pruning, depthwise factorization"
)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    optimize: optimize::OptimizeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Graph statistics: params, MACs, per-layer rows; two models side by side.
    Stats(stats::StatsArgs),
    /// Accuracy (tract) on labelled images or random inputs, with CI thresholds.
    Check(check::CheckArgs),
    /// List the pipelines shipped in the binary.
    Pipelines,
    /// tract latency of models at a fixed batch (median of several runs).
    Bench(bench::BenchArgs),
    /// A task model: the classifier replaced by one for the classes of a labelled folder.
    Retarget(retarget::RetargetArgs),
}

pub fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Stats(args)) => stats::run(&args).map(|_| ExitCode::SUCCESS),
        Some(Command::Check(args)) => check::run(&args),
        Some(Command::Pipelines) => pipelines::run().map(|_| ExitCode::SUCCESS),
        Some(Command::Bench(args)) => bench::run(&args).map(|_| ExitCode::SUCCESS),
        Some(Command::Retarget(args)) => retarget::run(&args).map(|_| ExitCode::SUCCESS),
        None => optimize::run(&cli.optimize),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}

/// Rust ignores SIGPIPE, so `println!` into a closed pipe (`stats | head`)
/// would panic; like other Unix tools, end quietly instead.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Parses `name:1,3,224,224` into a shape override.
fn parse_input_shape(spec: &str) -> Result<(String, Vec<usize>)> {
    let (name, dims) = spec.rsplit_once(':').with_context(|| format!("--input-shape `{spec}` is not NAME:D1,D2,…"))?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().with_context(|| format!("--input-shape `{spec}`: `{d}` is not a dimension")))
        .collect::<Result<Vec<_>>>()?;
    Ok((name.to_string(), dims))
}

fn input_shapes(specs: &[String]) -> Result<cresnet_opt::shape::InputShapes> {
    specs.iter().map(|s| parse_input_shape(s)).collect()
}

/// Loads a model (the path in the error context) validated with `--input-shape` overrides, and says on
/// stderr which size a symbolic height/width took.
fn load_shaped(path: &std::path::Path, overrides: &cresnet_opt::shape::InputShapes) -> Result<cresnet_opt::ir::Model> {
    let model = cresnet_opt::io::load_with(path, overrides).with_context(|| format!("cannot load model {}", path.display()))?;
    for note in cresnet_opt::shape::input_notes(&model.graph, overrides) {
        eprintln!("note: {}: {note}", path.display());
    }
    Ok(model)
}

/// Thousands separators for counts in tables.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
