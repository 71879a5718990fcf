//! `cresnet-opt check MODEL [--reference REF] [--data DIR --classes FILE | --random N] …`
//! Exit codes: 0 all thresholds met, 1 a threshold violated, 2 an error.
use super::{input_shapes, load_shaped};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use cresnet_opt::config::Preprocess;
use cresnet_opt::data::{labelled, LabelMap, Preprocessing};
use cresnet_opt::evaluate::{evaluate, Evaluation, Inputs};
use cresnet_opt::runner::Runner;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    model: PathBuf,
    /// Reference model (usually the original): agreement, max relative logit difference, top-1 drop.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Image folder DIR/<class id>/<image>.
    #[arg(long, conflicts_with = "random")]
    data: Option<PathBuf>,
    /// Class list: line k = output k, first word = class id.
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Compare MODEL with --reference on N random inputs (no data needed).
    #[arg(long, requires = "reference")]
    random: Option<usize>,
    /// caffe, torch, or a YAML file (mean, std, scale, channel_order, resize, crop).
    #[arg(long, default_value = "caffe")]
    preprocess: Preprocess,
    /// YAML map class → output indices / `a-b` ranges, for data sets with fewer classes.
    #[arg(long, conflicts_with = "classes")]
    label_map: Option<PathBuf>,
    /// Use only the first N images (sorted by path).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N images (sorted by path), e.g. 256 to leave out calibration images.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Images per tract run (batches run in parallel). 1 is fastest: tract
    /// takes ~2-3x longer per image at batch 4 or 16 (measured on ResNet-50).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Fail (exit 1) if the model's top-1 is more than this many points below the reference's.
    #[arg(long, requires = "reference")]
    max_top1_drop: Option<f64>,
    /// Fail (exit 1) if fewer than this share of images agree on top-1 with the reference.
    #[arg(long, requires = "reference")]
    min_agreement: Option<f64>,
    /// Fail (exit 1) if max |a−b| / max |a| of the logits exceeds this.
    #[arg(long, requires = "reference")]
    max_rel_diff: Option<f64>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// Random seed for --random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override an input's shape, e.g. `input:1,3,160,160` (the batch stays `--batch`).
    #[arg(long)]
    input_shape: Vec<String>,
}

pub fn run(args: &CheckArgs) -> Result<ExitCode> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let overrides = input_shapes(&args.input_shape)?;
    let open = |p: &PathBuf| {
        load_shaped(p, &overrides).and_then(|m| {
            let runner =
                Runner::with_shapes(&m, args.batch, &[], &overrides).with_context(|| format!("cannot run {} with tract", p.display()))?;
            Ok((m, runner))
        })
    };
    let (model, runner) = open(&args.model)?;
    let reference = args.reference.as_ref().map(|p| open(p).map(|(_, r)| r)).transpose()?;
    let outputs = output_count(&model)?;
    let preprocessing = Preprocessing::from_choice(&args.preprocess)?;
    let label_map = args.label_map.as_ref().map(|p| LabelMap::load(p, outputs)).transpose()?;
    let samples = match (&args.data, &label_map) {
        (Some(dir), Some(map)) => map.samples(dir)?,
        (Some(dir), None) => labelled(dir, args.classes.as_deref(), outputs)?,
        (None, _) => vec![],
    };
    let samples: Vec<_> = samples.into_iter().skip(args.skip).take(args.limit.unwrap_or(usize::MAX)).collect();
    let inputs = match (&args.data, args.random) {
        (Some(_), _) if samples.is_empty() => bail!("no images left after --skip {} / --limit", args.skip),
        (Some(_), _) => Inputs::Images { samples: &samples, preprocessing: &preprocessing, label_map: label_map.as_ref() },
        (None, Some(count)) => Inputs::Random { count, seed: args.seed },
        (None, None) => bail!("give --data DIR (labelled images) or --random N with --reference"),
    };
    let total = match &inputs {
        Inputs::Images { samples, .. } => samples.len(),
        Inputs::Random { count, .. } => *count,
    };
    let bar = progress_bar(total as u64, args.quiet);
    let eval = evaluate(&runner, reference.as_ref(), &inputs, args.batch, &|n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&eval)?),
        Format::Table => print_table(&eval),
    }
    let violations = violations(args, &eval);
    for v in &violations {
        eprintln!("threshold violated: {v}");
    }
    Ok(if violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn output_count(model: &cresnet_opt::ir::Model) -> Result<usize> {
    let out = model.graph.meta.output.first().context("the model has no output")?;
    let info = cresnet_opt::shape::value_info_tensor(out);
    match info.shape.as_deref() {
        Some([_, n]) => Ok(*n),
        _ => {
            let shapes = cresnet_opt::shape::infer(&model.graph, &Default::default())?;
            match shapes.get(out.name()).and_then(|t| t.shape.clone()).as_deref() {
                Some([_, n]) => Ok(*n),
                other => bail!("output `{}` has shape {other:?}, expected [batch, classes]", out.name()),
            }
        }
    }
}

fn progress_bar(total: u64, quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}").expect("valid template"));
    bar
}

fn print_table(e: &Evaluation) {
    println!("images        {}", e.images);
    if let Some(m) = e.model {
        println!("model         top-1 {:.4}  top-5 {:.4}", m.top1, m.top5);
    }
    if let Some(r) = e.reference {
        println!("reference     top-1 {:.4}  top-5 {:.4}", r.top1, r.top5);
    }
    if let Some(a) = e.agreement {
        println!("agreement     {a:.4}");
    }
    if let Some(d) = e.max_rel_diff {
        println!("max rel diff  {d:.3e}");
    }
    println!("time          {:.1} s ({:.1} images/s)", e.elapsed_s, e.images as f64 / e.elapsed_s.max(1e-9));
}

/// Each violated threshold, naming it and by how much.
fn violations(args: &CheckArgs, e: &Evaluation) -> Vec<String> {
    let mut out = vec![];
    if let (Some(limit), Some(m), Some(r)) = (args.max_top1_drop, e.model, e.reference) {
        let drop = 100.0 * (r.top1 - m.top1);
        if drop > limit {
            out.push(format!(
                "top-1 dropped {drop:.2} points ({:.4} -> {:.4}), limit {limit} (over by {:.2})",
                r.top1,
                m.top1,
                drop - limit
            ));
        }
    }
    if let (Some(limit), Some(a)) = (args.min_agreement, e.agreement) {
        if a < limit {
            out.push(format!("agreement {a:.4} is below {limit} (short by {:.4})", limit - a));
        }
    }
    if let (Some(limit), Some(d)) = (args.max_rel_diff, e.max_rel_diff) {
        if d > limit {
            out.push(format!("max relative logit difference {d:.3e} exceeds {limit:.3e} (by {:.3e})", d - limit));
        }
    }
    if args.max_top1_drop.is_some() && e.model.is_none() {
        out.push("--max-top1-drop needs labelled --data".into());
    }
    out
}
