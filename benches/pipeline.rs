//! Benchmarks (a plain harness: `cargo bench --bench pipeline`).
//! Times load / validate / save / each pass of the shared ResNet-50, median
//! of several runs. Needs ../shared/models/resnet50-imagenet.onnx.
use cresnet_opt::config::{DwOptions, FoldOptions, PassSpec, PruneOptions};
use std::path::Path;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    median((0..runs).map(|_| {
        let t = Instant::now();
        std::hint::black_box(f());
        t.elapsed().as_secs_f64()
    }).collect())
}

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/resnet50-imagenet.onnx");
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return;
    }
    let runs = 7;
    let out = std::env::temp_dir().join("cresnet-bench-out.onnx");
    let model = cresnet_opt::io::load(&path).expect("load");
    println!("load (read + decode + validate)   {:>8.1} ms", 1e3 * time(runs, || cresnet_opt::io::load(&path).expect("load")));
    println!("validate                          {:>8.1} ms", 1e3 * time(runs, || cresnet_opt::validate::validate(&model.graph, &Default::default()).expect("valid")));
    println!("encode to bytes                   {:>8.1} ms", 1e3 * time(runs, || cresnet_opt::io::to_bytes(&model).expect("encode")));
    println!("save (encode + write + rename)    {:>8.1} ms", 1e3 * time(runs, || cresnet_opt::io::save(&model, &out, false).expect("save")));
    let passes = [
        ("fold", vec![PassSpec::Fold(FoldOptions::default())]),
        ("fold,prune", vec![PassSpec::Fold(FoldOptions::default()), PassSpec::Prune(PruneOptions::default())]),
        ("fold,prune,dw", vec![PassSpec::Fold(FoldOptions::default()), PassSpec::Prune(PruneOptions::default()), PassSpec::Dw(DwOptions::default())]),
    ];
    for (name, specs) in passes {
        let t = time(runs, || {
            let mut m = model.clone();
            cresnet_opt::passes::run_pipeline(&mut m, &specs, &Default::default(), |_| {}).expect("passes")
        });
        println!("passes {name:<26} {:>8.1} ms (in memory, incl. validation)", 1e3 * t);
    }
    let _ = std::fs::remove_file(out);
}
