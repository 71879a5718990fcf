//! Writes a deterministic ResNet-50-topology fixture model.
//! `cargo run --release --bin make-fixture -- fixtures/resnet50-w8.onnx` regenerates the shipped one.
use anyhow::{Context, Result};
use clap::Parser;
use cresnet_opt::fixture::{resnet50, FixtureSpec, Layout};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Write a ResNet-50-topology ONNX fixture with deterministic weights")]
struct Args {
    output: PathBuf,
    /// Channel widths are ResNet-50's divided by this.
    #[arg(long, default_value_t = 8)]
    width_div: usize,
    #[arg(long, default_value_t = 224)]
    input_size: usize,
    #[arg(long, value_enum, default_value = "keras")]
    layout: Layout,
    /// Fold BN into the convs.
    #[arg(long)]
    folded: bool,
    #[arg(long, default_value_t = 1000)]
    classes: usize,
    #[arg(long, default_value_t = 50)]
    seed: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let spec = FixtureSpec {
        width_div: a.width_div.max(1),
        input_size: a.input_size,
        layout: a.layout,
        folded: a.folded,
        classes: a.classes.max(1),
        seed: a.seed,
        ..Default::default()
    };
    let model = resnet50(&spec)?;
    cresnet_opt::io::save(&model, &a.output, false).with_context(|| format!("cannot write {}", a.output.display()))?;
    Ok(())
}
