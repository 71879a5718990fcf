//! `cresnet-opt IN -o OUT (--passes LIST | --pipeline NAME | --config FILE)`.
use super::{group, input_shapes, load_shaped};
use anyhow::{bail, Context, Result};
use clap::Args;
use cresnet_opt::config::{shipped_pipeline, CalibrationDefaults, PipelineFile};
use cresnet_opt::passes::distill::DistillOptions;
use cresnet_opt::passes::PassReport;
use cresnet_opt::passes::{PassSpec, PASS_NAMES};
use cresnet_opt::shape::InputShapes;
use cresnet_opt::train::kernels::Precision;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// The ONNX model to optimize.
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Where to write the optimized model (written atomically).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// Comma-separated passes, applied in order with default options; `none` = round trip.
    #[arg(long, value_delimiter = ',', value_parser = parse_pass, group = "source")]
    passes: Vec<Option<PassSpec>>,
    /// A shipped pipeline by name (see `cresnet-opt pipelines`).
    #[arg(long, group = "source")]
    pipeline: Option<String>,
    /// A pipeline file (YAML): `pipeline`, `passes`, `calibration`, `calibration_defaults`.
    #[arg(long, group = "source")]
    config: Option<PathBuf>,
    /// Write the pass reports as JSON (for CI).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Override an input's shape, e.g. `input:1,3,224,224`.
    #[arg(long)]
    input_shape: Vec<String>,
    /// Write tensor data to `OUT.data` beside the model (models over 2 GB).
    #[arg(long)]
    external_data: bool,
    /// Checkpoint file of the `distill` pass: resumed if it exists, rewritten after every epoch.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Directory of the `distill` pass's teacher-output cache: later runs on
    /// the same teacher, photos and seed reuse the outputs instead of recomputing them.
    #[arg(long)]
    teacher_cache: Option<PathBuf>,
    /// Arithmetic of the `distill` pass's matrix products: `bf16` (operands
    /// rounded to bf16, sums in f32; needs AVX512-BF16) trains and runs the
    /// teacher ~1.35x faster; `f32` is the default.
    #[arg(long, value_parser = ["f32", "bf16"])]
    precision: Option<String>,
    /// No per-pass summary on stderr (warnings still show).
    #[arg(short, long)]
    quiet: bool,
    /// Exit 1, writing nothing, when a pass changed nothing (a CI pipeline
    /// must not ship an uncompressed model believing it compressed).
    #[arg(long)]
    strict: bool,
}

/// `none` parses as `None` (no pass); anything else must be a pass name.
fn parse_pass(s: &str) -> Result<Option<PassSpec>, String> {
    if s == "none" {
        return Ok(None);
    }
    PassSpec::default_for(s).map(Some).ok_or_else(|| format!("unknown pass `{s}` (valid: none, {})", PASS_NAMES.join(", ")))
}

#[derive(Serialize)]
struct RunReport<'a> {
    input: &'a Path,
    output: &'a Path,
    passes: &'a [PassReport],
    params_before: u64,
    params_after: u64,
    macs_before: u64,
    macs_after: u64,
    seconds: f64,
}

/// What a run was asked to do: its passes, the calibration settings (from
/// a pipeline file) and, when the passes are a shipped pipeline's, its name.
struct Plan {
    passes: Vec<PassSpec>,
    /// The pipeline file, whose calibration the run uses (with the defaults
    /// of the recipe that runs, once chosen).
    file: Option<PipelineFile>,
    shipped: Option<String>,
    /// The shipped recipe's calibration defaults (used only with a
    /// pipeline file: without one there is no calibration).
    defaults: Option<CalibrationDefaults>,
}

fn pipeline_passes(args: &OptimizeArgs) -> Result<Plan> {
    if let Some(path) = &args.config {
        let file = PipelineFile::load(path).with_context(|| format!("cannot use pipeline file {}", path.display()))?;
        let shipped = file.shipped().map(str::to_string);
        let defaults = shipped.as_deref().map(shipped_pipeline).transpose()?.and_then(|r| r.calibration_defaults);
        return Ok(Plan { passes: file.resolve_passes()?, file: Some(file), shipped, defaults });
    }
    if let Some(name) = &args.pipeline {
        let recipe = shipped_pipeline(name)?;
        return Ok(Plan {
            passes: recipe.passes.unwrap_or_default(),
            file: None,
            shipped: Some(name.clone()),
            defaults: recipe.calibration_defaults,
        });
    }
    if args.passes.is_empty() {
        bail!("nothing to do: give --passes LIST (or `none`), --pipeline NAME or --config FILE");
    }
    Ok(Plan { passes: args.passes.iter().flatten().cloned().collect(), file: None, shipped: None, defaults: None })
}

/// A shipped pipeline that has a recipe for task models (`cresnet` →
/// `cresnet-task`) switches to it when the model has few classes, and says so.
fn for_the_model(plan: &mut Plan, model: &cresnet_opt::ir::Model, overrides: &InputShapes, quiet: bool) -> Result<()> {
    let Some(name) = plan.shipped.as_deref() else { return Ok(()) };
    let shapes = cresnet_opt::validate::validate(&model.graph, overrides)?;
    let classes = cresnet_opt::config::class_count(&model.graph, &shapes);
    let chosen = cresnet_opt::config::pipeline_for(name, classes);
    if chosen != name {
        if !quiet {
            eprintln!(
                "note: pipeline `{name}`: the model has {} classes (at most {}): running its task recipe `{chosen}`",
                classes.unwrap_or(0),
                cresnet_opt::config::TASK_CLASSES
            );
        }
        let recipe = shipped_pipeline(chosen)?;
        plan.passes = recipe.passes.unwrap_or_default();
        plan.defaults = recipe.calibration_defaults;
    }
    Ok(())
}

/// The options of every `distill` pass, for a `flag` that sets one of them
/// (an error when there is none: the flag would do nothing).
fn distill_options<'a>(passes: &'a mut [PassSpec], flag: &str) -> Result<impl Iterator<Item = &'a mut DistillOptions>> {
    let mut distills = passes.iter_mut().filter_map(|p| if let PassSpec::Distill(o) = p { Some(o) } else { None }).peekable();
    if distills.peek().is_none() {
        bail!("{flag} is for the `distill` pass, and the pipeline has none");
    }
    Ok(distills)
}

pub fn run(args: &OptimizeArgs) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let (input, output) = (args.input.as_deref().expect("required"), args.output.as_deref().expect("required"));
    let mut plan = pipeline_passes(args)?;
    let overrides = input_shapes(&args.input_shape)?;
    let mut model = load_shaped(input, &overrides)?;
    for_the_model(&mut plan, &model, &overrides, args.quiet)?;
    let Plan { mut passes, file, defaults, .. } = plan;
    let calibration = file.and_then(|f| f.calibration_with(defaults));
    if let Some(path) = &args.checkpoint {
        distill_options(&mut passes, "--checkpoint")?.for_each(|o| o.checkpoint = Some(path.clone()));
    }
    if let Some(p) = &args.precision {
        let precision = if p == "bf16" { Precision::Bf16 } else { Precision::F32 };
        distill_options(&mut passes, "--precision")?.for_each(|o| o.precision = precision);
        passes.iter().try_for_each(PassSpec::check).context("--precision")?;
    }
    if let Some(dir) = &args.teacher_cache {
        distill_options(&mut passes, "--teacher-cache")?.for_each(|o| o.teacher_cache = Some(dir.clone()));
        passes.iter().try_for_each(PassSpec::check).context("--teacher-cache")?;
    }
    let calibration = calibration
        .map(|c| {
            let loaded = cresnet_opt::refit::Calibration::load(&c)
                .with_context(|| format!("cannot load calibration images from {}", c.data.display()))?;
            if !args.quiet {
                let extra = if c.refit_extra > 0 { format!(", + up to {} `extra` images", c.refit_extra) } else { String::new() };
                eprintln!(
                    "calibration: {} images for the refits ({} asked of {}{extra}), {} positions per image and layer (at least)",
                    loaded.images.len(),
                    c.images,
                    c.data.display(),
                    c.positions
                );
            }
            anyhow::Ok(loaded)
        })
        .transpose()?;
    if calibration.is_none() && passes.iter().any(PassSpec::lossy) && !args.quiet {
        eprintln!(
            "note: no calibration images: lossy passes run data-free, so accuracy will suffer (add `calibration:` to a pipeline file)"
        );
    }
    let reports = cresnet_opt::passes::run_pipeline_with(
        &mut model,
        &passes,
        &overrides,
        calibration.as_ref(),
        &super::progress::Bar::default(),
        |r| {
            if !args.quiet {
                eprintln!("{}", summary(r));
            }
        },
    )?;
    let idle: Vec<&PassReport> = reports.iter().filter(|r| r.changed.is_empty()).collect();
    for r in &idle {
        let why = r.declined.first().map_or_else(|| "nothing it applies to".to_string(), |d| format!("`{}`: {}", d.node, d.reason));
        eprintln!("warning: pass `{}` changed nothing ({} declined; first: {why})", r.pass, r.declined.len());
    }
    if args.strict && !idle.is_empty() {
        eprintln!("error: --strict: {} pass(es) changed nothing; {} not written", idle.len(), output.display());
        return Ok(ExitCode::from(1));
    }
    cresnet_opt::io::save(&model, output, args.external_data).with_context(|| format!("cannot write {}", output.display()))?;
    if let Some(path) = &args.report {
        // The passes counted before and after; a round trip (no pass) is counted here.
        let (params, macs) = match (reports.first(), reports.last()) {
            (Some(first), Some(last)) => ((first.params_before, last.params_after), (first.macs_before, last.macs_after)),
            _ => {
                let s = cresnet_opt::stats::compute(&model.graph, &overrides)?;
                ((s.params, s.params), (s.macs, s.macs))
            }
        };
        let report = RunReport {
            input,
            output,
            passes: &reports,
            params_before: params.0,
            params_after: params.1,
            macs_before: macs.0,
            macs_after: macs.1,
            seconds: started.elapsed().as_secs_f64(),
        };
        cresnet_opt::io::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One pass's line on stderr, plus its first few declines.
fn summary(r: &PassReport) -> String {
    let pct = |a: u64, b: u64| if b == 0 { 100.0 } else { 100.0 * a as f64 / b as f64 };
    let mut s = format!(
        "{}: {} changed, {} declined; params {} -> {} ({:.1}%), MACs {} -> {} ({:.1}%); {:.2} s",
        r.pass,
        r.changed.len(),
        r.declined.len(),
        group(r.params_before),
        group(r.params_after),
        pct(r.params_after, r.params_before),
        group(r.macs_before),
        group(r.macs_after),
        pct(r.macs_after, r.macs_before),
        r.seconds
    );
    for d in r.declined.iter().take(5) {
        s.push_str(&format!("\n  declined `{}`: {}", d.node, d.reason));
    }
    if r.declined.len() > 5 {
        s.push_str(&format!("\n  … and {} more (see --report)", r.declined.len() - 5));
    }
    s
}
