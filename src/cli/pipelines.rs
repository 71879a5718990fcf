//! `cresnet-opt pipelines`: the pipelines shipped in the binary (`passes/pipelines/`).
use anyhow::Result;

pub fn run() -> Result<()> {
    for (name, summary, _) in cresnet_opt::passes::PIPELINES {
        println!("{name:<10} {summary}");
    }
    Ok(())
}
