//! `cresnet-opt bench MODEL…`: tract latency at a fixed batch, median of
//! several runs after a warm-up, for 1 and 2 (or the given) thread counts.
use super::load;
use crate::runner::Runner;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The ONNX models to time.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Thread counts to time, e.g. `1,2`.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs per thread count (after one warm-up run).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Timing {
    model: PathBuf,
    batch: usize,
    threads: usize,
    median_ms: f64,
    min_ms: f64,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.runs == 0 || args.batch == 0 || args.threads.contains(&0) {
        bail!("--runs, --batch and --threads must be at least 1");
    }
    let mut timings = Vec::new();
    for path in &args.models {
        let model = load(path)?;
        let runner = Runner::new(&model, args.batch, &[]).with_context(|| format!("cannot run {} with tract", path.display()))?;
        let x = ndarray::ArrayD::<f32>::from_elem(runner.input_shape.clone(), 0.5);
        for &threads in &args.threads {
            runner.run_threads(x.clone(), threads)?;
            let mut ms: Vec<f64> = (0..args.runs)
                .map(|_| {
                    let t = std::time::Instant::now();
                    runner.run_threads(x.clone(), threads).map(|_| 1e3 * t.elapsed().as_secs_f64())
                })
                .collect::<crate::error::Result<_>>()?;
            ms.sort_by(f64::total_cmp);
            let timing = Timing { model: path.clone(), batch: args.batch, threads, median_ms: ms[ms.len() / 2], min_ms: ms[0] };
            if !args.json {
                println!("{:<40} batch {} threads {}: median {:.1} ms, min {:.1} ms", path.display(), timing.batch, threads, timing.median_ms, timing.min_ms);
            }
            timings.push(timing);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&timings)?);
    }
    Ok(())
}
