//! `cresnet-opt bench MODEL…`: tract latency at a fixed batch, median of
//! several runs after a warm-up, for 1 and 2 (or the given) thread counts.
//! The models take turns run by run, and each is compared with the first.
use super::{input_shapes, load_shaped};
use anyhow::{bail, Context, Result};
use clap::Args;
use cresnet_opt::runner::Runner;
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
    /// Instead of whole-model latency: time every node of tract's plan
    /// (1 thread, batch `--batch`, mean of `--runs`) and show the time per
    /// operator and the slowest nodes.
    #[arg(long)]
    profile: bool,
    /// Slowest nodes listed by `--profile`.
    #[arg(long, default_value_t = 15)]
    top: usize,
    /// Override an input's shape, e.g. `input:1,3,160,160` (the batch stays `--batch`).
    #[arg(long)]
    input_shape: Vec<String>,
}

/// Time per tract operator, summed over its nodes.
#[derive(Serialize)]
struct OpTime {
    op: String,
    nodes: usize,
    ms: f64,
}

#[derive(Serialize)]
struct Profile {
    model: PathBuf,
    batch: usize,
    total_ms: f64,
    ops: Vec<OpTime>,
    slowest: Vec<cresnet_opt::runner::NodeTime>,
}

#[derive(Serialize)]
struct Timing {
    model: PathBuf,
    batch: usize,
    threads: usize,
    median_ms: f64,
    min_ms: f64,
    /// The first model's median over this one's, same thread count.
    speedup: f64,
    /// The median over runs of the first model's time over this one's in
    /// the same round: a load that comes and goes between rounds cancels.
    paired_speedup: f64,
    /// Every timed run, in order (round k of every model is run k).
    times_ms: Vec<f64>,
}

/// The median of a latency list: the upper middle one for an even count
/// (a time that was measured, and the slower of the two).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The median of a list of ratios: the mean of the two middle ones for an
/// even count (the upper one would flatter the faster model).
fn median_ratio(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.runs == 0 || args.batch == 0 || args.threads.contains(&0) {
        bail!("--runs, --batch and --threads must be at least 1");
    }
    if args.profile {
        return profile(args);
    }
    let runners = args.models.iter().map(|path| Ok((path, load_runner(args, path)?))).collect::<Result<Vec<_>>>()?;
    let mut timings = Vec::new();
    for &threads in &args.threads {
        // Round-robin: run k of every model, then run k+1, so that slow drift
        // falls on every model rather than on one (a steady competing load
        // still scatters the medians: see the README).
        let mut ms = vec![Vec::with_capacity(args.runs); runners.len()];
        for (_, (runner, x)) in &runners {
            runner.run_threads(x.clone(), threads)?;
        }
        for _ in 0..args.runs {
            for ((_, (runner, x)), times) in runners.iter().zip(&mut ms) {
                let t = std::time::Instant::now();
                runner.run_threads(x.clone(), threads)?;
                times.push(1e3 * t.elapsed().as_secs_f64());
            }
        }
        let first = ms[0].clone();
        for ((path, ..), times) in runners.iter().zip(ms) {
            let median_ms = median(&times);
            let ratios: Vec<f64> = first.iter().zip(&times).map(|(a, b)| a / b).collect();
            let timing = Timing {
                model: (*path).clone(),
                batch: args.batch,
                threads,
                median_ms,
                min_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
                speedup: median(&first) / median_ms,
                paired_speedup: median_ratio(&ratios),
                times_ms: times,
            };
            if !args.json {
                println!(
                    "{:<40} batch {} threads {}: median {:.1} ms, min {:.1} ms, {:.2}x the first ({:.2}x paired by run)",
                    path.display(),
                    timing.batch,
                    threads,
                    timing.median_ms,
                    timing.min_ms,
                    timing.speedup,
                    timing.paired_speedup
                );
            }
            timings.push(timing);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&timings)?);
    }
    Ok(())
}

/// The tract plan of `path` at `--batch` (and `--input-shape`), with its
/// input filled with 0.5.
fn load_runner(args: &BenchArgs, path: &std::path::Path) -> Result<(Runner, ndarray::ArrayD<f32>)> {
    let overrides = input_shapes(&args.input_shape)?;
    let model = load_shaped(path, &overrides)?;
    let runner =
        Runner::with_shapes(&model, args.batch, &[], &overrides).with_context(|| format!("cannot run {} with tract", path.display()))?;
    let x = ndarray::ArrayD::<f32>::from_elem(runner.input_shape.clone(), 0.5);
    Ok((runner, x))
}

fn profile(args: &BenchArgs) -> Result<()> {
    let mut profiles = Vec::new();
    for path in &args.models {
        let (runner, x) = load_runner(args, path)?;
        let nodes = runner.profile(x, args.runs)?;
        let mut ops: Vec<OpTime> = Vec::new();
        for n in &nodes {
            match ops.iter_mut().find(|o| o.op == n.op) {
                Some(o) => (o.nodes, o.ms) = (o.nodes + 1, o.ms + n.ms),
                None => ops.push(OpTime { op: n.op.clone(), nodes: 1, ms: n.ms }),
            }
        }
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        let mut slowest = nodes.clone();
        slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        slowest.truncate(args.top);
        let total_ms = nodes.iter().map(|n| n.ms).sum();
        let p = Profile { model: path.clone(), batch: args.batch, total_ms, ops, slowest };
        if !args.json {
            print_profile(&p);
        }
        profiles.push(p);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&profiles)?);
    }
    Ok(())
}

fn print_profile(p: &Profile) {
    println!("{}: batch {}, 1 thread, {:.1} ms in nodes", p.model.display(), p.batch, p.total_ms);
    println!("{:<28} {:>6} {:>9} {:>7}", "operator", "nodes", "ms", "share");
    for o in &p.ops {
        println!("{:<28} {:>6} {:>9.2} {:>6.1}%", o.op, o.nodes, o.ms, 100.0 * o.ms / p.total_ms.max(1e-9));
    }
    println!("slowest nodes:");
    for n in &p.slowest {
        println!("  {:<48} {:<20} {:>8.2} ms", n.name, n.op, n.ms);
    }
}
