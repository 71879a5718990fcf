//! Outputs pinned by their SHA-256: the shipped fixture and the shared
//! ResNet-50 through `--passes fold,prune,dw`, `--pipeline cresnet`
//! (data-free) and a calibrated `dw` must give exactly these bytes. The
//! digests were taken before the pass registry was introduced (commit
//! d10e541), so a refactoring that changes any output fails here; a change
//! meant to alter outputs updates them and says why in its commit.
//!
//! Changed since: the fixture's `--pipeline cresnet` (session 8): the
//! pipeline's `budget: 0.2` now holds its promise on the 1/8-width fixture
//! too, which the fixed ratios kept at 21.97 % of the weights (19.83 % now);
//! the shared ResNet-50's outputs are unchanged. The two calibrated `dw`
//! digests (session 13): the solves form XᵀX and XᵀY from the f32 rows in
//! blocks instead of from one f64 copy (calibration memory, issue #18), so
//! the sums run in another order; against the previous outputs the logits
//! differ by at most 9.7e-7 (relative, `check --random 8`) and every
//! layer's reported error is the same to four digits.
mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Runs the CLI on `model` with `args` and returns the output's SHA-256 (hex).
fn digest_of(model: &Path, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let status = bin().arg(model).arg("-o").arg(&out).args(args).arg("-q").output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let bytes = std::fs::read(&out).unwrap();
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A pipeline file factorizing with `dw` at rank 2 (`bounds`: extra dw
/// options), calibrated on the first 4 images of the shared sample.
fn calibrated_dw(dir: &Path, bounds: &str) -> std::path::PathBuf {
    let data = shared().join("data/imagenet-1k-sample").canonicalize().expect("../shared/data/imagenet-1k-sample");
    let path = dir.join("dw.yaml");
    let yaml =
        format!("passes: [fold, {{dw: {{rank: 2{bounds}}}}}]\ncalibration: {{ data: {}, images: 4, positions: 8 }}\n", data.display());
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn fixture_outputs_are_unchanged() {
    let m = fixture_path();
    assert_eq!(digest_of(&m, &["--passes", "fold,prune,dw"]), "1669fa149d7b1a20feb5857a567a20e275db30124e82b528711e2f5feffe4b93");
    assert_eq!(digest_of(&m, &["--pipeline", "cresnet"]), "92f477ed7dee7f696d2145eb3105e600b22db4ad0023cbb60c5996064acaa5d3");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn fixture_calibrated_dw_output_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let config = calibrated_dw(dir.path(), "");
    let got = digest_of(&fixture_path(), &["--config", config.to_str().unwrap()]);
    assert_eq!(got, "9d31fa8a174220221f2f8a6d418924754e406abe767b0f8c7ee53d937ff3be60");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn shared_model_outputs_are_unchanged() {
    let m = shared_model();
    assert_eq!(digest_of(&m, &["--passes", "fold,prune,dw"]), "8f87b9ce1b4d8e9a2aae574866f15121530fa6e550f0340ec81bb4ce541fabeb");
    assert_eq!(digest_of(&m, &["--pipeline", "cresnet"]), "1a5bc6fadb5627000fb718ba8fa1ec5140180e38e3ec64516c0aed21cc86eddc");
    // The 7-pixel stage only: the calibrated path at a fraction of the time.
    let dir = tempfile::tempdir().unwrap();
    let config = calibrated_dw(dir.path(), ", max_resolution: 7");
    assert_eq!(digest_of(&m, &["--config", config.to_str().unwrap()]), "df9af4785c7965984ef5980e237425e5813f8b4de62c9a86b418886bb468b631");
}
