//! `cresnet-opt retarget IN --data DIR --classes FILE -o OUT`: the `retarget`
//! pass on its own (see `passes/retarget.rs`), with its report on stderr.
use super::{input_shapes, load_shaped};
use anyhow::{Context, Result};
use clap::Args;
use cresnet_opt::config::Preprocess;
use cresnet_opt::passes::retarget::RetargetOptions;
use cresnet_opt::passes::PassSpec;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct RetargetArgs {
    /// An ImageNet-style classifier (ONNX) whose last Gemm is replaced.
    model: PathBuf,
    /// Labelled photos: DIR/<class>/<image>.
    #[arg(long)]
    data: PathBuf,
    /// Class list: line k = output k of the task model; first word = class folder.
    #[arg(long)]
    classes: PathBuf,
    /// Where to write the task model (atomically).
    #[arg(short, long)]
    output: PathBuf,
    /// caffe, torch, or a YAML file (as for `check`).
    #[arg(long, default_value = "caffe")]
    preprocess: Preprocess,
    /// At most N photos per class.
    #[arg(long)]
    images: Option<usize>,
    /// Folds of the cross-validation that picks the regularization.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Write the pass report as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Override an input's shape, e.g. `input:1,3,224,224`.
    #[arg(long)]
    input_shape: Vec<String>,
}

pub fn run(args: &RetargetArgs) -> Result<()> {
    let opts = RetargetOptions {
        data: args.data.clone(),
        classes: args.classes.clone(),
        preprocess: args.preprocess.clone(),
        images: args.images,
        folds: args.folds,
        ..Default::default()
    };
    let spec = PassSpec::Retarget(opts);
    spec.check()?;
    let overrides = input_shapes(&args.input_shape)?;
    let mut model = load_shaped(&args.model, &overrides)?;
    let reports = cresnet_opt::passes::run_pipeline(&mut model, &[spec], &overrides, |r| {
        for c in &r.changed {
            eprintln!("{}: {}", c.node, c.what);
        }
        for d in &r.declined {
            eprintln!("declined `{}`: {}", d.node, d.reason);
        }
    })?;
    let retarget = reports.iter().find(|r| r.pass == "retarget").context("no retarget report")?;
    if retarget.changed.is_empty() {
        let why = retarget.declined.first().map_or("nothing to retarget".to_string(), |d| d.reason.clone());
        anyhow::bail!("cannot retarget {}: {why}", args.model.display());
    }
    cresnet_opt::io::save(&model, &args.output, false).with_context(|| format!("cannot write {}", args.output.display()))?;
    if let Some(path) = &args.report {
        cresnet_opt::io::write_atomic(path, serde_json::to_string_pretty(&reports)?.as_bytes())
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    Ok(())
}
