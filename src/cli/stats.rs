//! `cresnet-opt stats MODEL [MODEL2] [--format table|json|yaml]`.
use super::{group, input_shapes, load_shaped};
use anyhow::Result;
use clap::{Args, ValueEnum};
use cresnet_opt::stats::{stages, Stats};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    model: PathBuf,
    /// A second model (e.g. the compressed one): before/after side by side.
    model2: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Override an input's shape, e.g. `input:1,3,224,224`.
    #[arg(long)]
    input_shape: Vec<String>,
}

/// Before/after totals with ratios, and the per-stage view.
#[derive(Serialize)]
struct Comparison<'a> {
    before: &'a Stats,
    after: &'a Stats,
    params_ratio: f64,
    macs_ratio: f64,
    /// Params and MACs per stage (layers grouped by output resolution).
    stages_before: Vec<cresnet_opt::stats::Stage>,
    stages_after: Vec<cresnet_opt::stats::Stage>,
}

fn stats_of(path: &std::path::Path, args: &StatsArgs) -> Result<Stats> {
    let overrides = input_shapes(&args.input_shape)?;
    let model = load_shaped(path, &overrides)?;
    Ok(cresnet_opt::stats::compute(&model.graph, &overrides)?)
}

pub fn run(args: &StatsArgs) -> Result<()> {
    let a = stats_of(&args.model, args)?;
    let b = args.model2.as_ref().map(|p| stats_of(p, args)).transpose()?;
    let ratio = |x: u64, y: u64| if y == 0 { 0.0 } else { x as f64 / y as f64 };
    match (args.format, &b) {
        (Format::Json, None) => println!("{}", serde_json::to_string_pretty(&a)?),
        (Format::Yaml, None) => print!("{}", yaml_serde::to_string(&a)?),
        (Format::Json | Format::Yaml, Some(b)) => {
            let c = Comparison {
                before: &a,
                after: b,
                params_ratio: ratio(b.params, a.params),
                macs_ratio: ratio(b.macs, a.macs),
                stages_before: stages(&a),
                stages_after: stages(b),
            };
            match args.format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&c)?),
                _ => print!("{}", yaml_serde::to_string(&c)?),
            }
        }
        (Format::Table, None) => print_table(&a),
        (Format::Table, Some(b)) => print_comparison(&a, b),
    }
    Ok(())
}

fn shape_text(s: &Option<Vec<usize>>) -> String {
    s.as_ref().map_or("?".into(), |s| s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x"))
}

fn print_table(s: &Stats) {
    println!("{:<28} {:<20} {:>16} {:>12} {:>15} {:>7}", "layer", "op", "output", "params", "MACs", "share");
    for l in &s.layers {
        println!(
            "{:<28} {:<20} {:>16} {:>12} {:>15} {:>6.2}%",
            l.name,
            l.op,
            shape_text(&l.output_shape),
            group(l.params),
            group(l.macs),
            100.0 * l.share
        );
    }
    println!();
    print_totals(s);
}

fn print_totals(s: &Stats) {
    println!("params {}  MACs {}  nodes {}", group(s.params), group(s.macs), s.nodes);
    let ops: Vec<String> = s.ops.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!("ops: {}", ops.join(", "));
}

fn print_comparison(a: &Stats, b: &Stats) {
    let pct = |x: u64, y: u64| if y == 0 { "-".to_string() } else { format!("{:.1}%", 100.0 * x as f64 / y as f64) };
    println!(
        "{:<10} {:>14} {:>14} {:>8}   {:>16} {:>16} {:>8}",
        "stage", "params before", "params after", "kept", "MACs before", "MACs after", "kept"
    );
    let (sa, sb) = (stages(a), stages(b));
    for st in &sa {
        let other = sb.iter().find(|x| x.stage == st.stage);
        let (p, m) = other.map_or((0, 0), |o| (o.params, o.macs));
        println!(
            "{:<10} {:>14} {:>14} {:>8}   {:>16} {:>16} {:>8}",
            st.stage,
            group(st.params),
            group(p),
            pct(p, st.params),
            group(st.macs),
            group(m),
            pct(m, st.macs)
        );
    }
    for st in sb.iter().filter(|x| !sa.iter().any(|y| y.stage == x.stage)) {
        println!("{:<10} {:>14} {:>14} {:>8}   {:>16} {:>16} {:>8}", st.stage, 0, group(st.params), "new", 0, group(st.macs), "new");
    }
    println!(
        "{:<10} {:>14} {:>14} {:>8}   {:>16} {:>16} {:>8}",
        "total",
        group(a.params),
        group(b.params),
        pct(b.params, a.params),
        group(a.macs),
        group(b.macs),
        pct(b.macs, a.macs)
    );
    println!("nodes {} -> {}", a.nodes, b.nodes);
    let mut ops: Vec<&String> = a.ops.keys().chain(b.ops.keys()).collect();
    ops.sort();
    ops.dedup();
    let row: Vec<String> = ops.iter().map(|k| format!("{k} {}->{}", a.ops.get(*k).unwrap_or(&0), b.ops.get(*k).unwrap_or(&0))).collect();
    println!("ops: {}", row.join(", "));
}
