//! Tests on the real ResNet-50 in ../shared. Ignored in a plain `cargo test`;
//! `.ci/run` runs them with `--include-ignored`.
mod common;
use common::*;
use cresnet_opt::config::PruneOptions;

fn load() -> cresnet_opt::ir::Model {
    cresnet_opt::io::load(&shared_model()).expect("../shared/models/resnet50-imagenet.onnx")
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn fold_removes_every_bn_and_keeps_the_logits() {
    let original = load();
    let mut folded = original.clone();
    let r = run_passes(&mut folded, &[fold()]).remove(0);
    assert_eq!(r.changed.len(), 53);
    assert_eq!(r.params_after, 25_530_472);
    assert_eq!(folded.graph.net.node_weights().filter(|n| n.op() == "BatchNormalization").count(), 0);
    let x = random_input(&original, 2, 120.0, 3);
    let d = rel_diff(&run(&original, &x), &run(&folded, &x));
    assert!(d < 1e-5, "rel diff {d}");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn dw_rank9_reproduces_the_logits() {
    let original = load();
    let mut m = original.clone();
    let r = run_passes(&mut m, &[fold(), dw(9)]);
    assert_eq!(r[1].changed.len(), 16);
    let x = random_input(&original, 1, 120.0, 4);
    let d = rel_diff(&run(&original, &x), &run(&m, &x));
    assert!(d < 1e-4, "rel diff {d}");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn pruning_to_half_the_macs_validates_and_runs() {
    let original = load();
    let mut m = original.clone();
    let r = run_passes(&mut m, &[fold(), prune(PruneOptions { target_macs: Some(0.5), ..Default::default() })]);
    let share = r[1].macs_after as f64 / 3_857_973_248.0;
    assert!(share <= 0.5 && share > 0.49, "MACs share {share}");
    let x = random_input(&original, 1, 120.0, 5);
    assert_eq!(run(&m, &x).shape(), &[1, 1000]);
}

fn check_json(args: &[&str]) -> serde_json::Value {
    let o = bin().arg("check").args(args).args(["--format", "json", "--quiet"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn check_scores_the_shared_model_on_all_1000_images() {
    let data = shared().join("data");
    let v = check_json(&[shared_model().to_str().unwrap(), "--data", data.join("imagenet-1k-sample").to_str().unwrap(), "--classes", data.join("imagenet-1k-classes.txt").to_str().unwrap()]);
    assert_eq!(v["images"], 1000);
    let top1 = v["model"]["top1"].as_f64().unwrap();
    assert!((top1 - 0.908).abs() <= 0.015, "top-1 {top1}");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn folded_model_agrees_with_the_original_on_real_images() {
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("folded.onnx");
    let o = bin().arg(shared_model()).arg("-o").arg(&folded).args(["--passes", "fold", "--quiet"]).output().unwrap();
    assert!(o.status.success());
    let data = shared().join("data");
    let v = check_json(&[
        folded.to_str().unwrap(),
        "--reference",
        shared_model().to_str().unwrap(),
        "--data",
        data.join("imagenet-1k-sample").to_str().unwrap(),
        "--classes",
        data.join("imagenet-1k-classes.txt").to_str().unwrap(),
        "--limit",
        "100",
        "--min-agreement",
        "1.0",
        "--max-rel-diff",
        "1e-5",
    ]);
    assert_eq!(v["agreement"], 1.0);
    assert_eq!(v["model"], v["reference"]);
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn animals10_zero_shot_with_the_label_map() {
    let data = shared().join("data");
    let v = check_json(&[shared_model().to_str().unwrap(), "--data", data.join("animals10-sample").to_str().unwrap(), "--label-map", data.join("animals10-imagenet-map.yaml").to_str().unwrap()]);
    assert_eq!(v["images"], 320);
    let top1 = v["model"]["top1"].as_f64().unwrap();
    assert!((top1 - 0.82).abs() < 0.03, "top-1 {top1}");
}
