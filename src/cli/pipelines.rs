//! `cresnet-opt pipelines`: the recipes shipped in the binary.
use anyhow::Result;

pub fn run() -> Result<()> {
    for (name, summary, _) in cresnet_opt::passes::PIPELINES {
        println!("{name:<10} {summary}");
    }
    Ok(())
}
