//! `check` on labelled image folders: class mapping, label maps, presets, errors.
mod common;
use common::*;
use cresnet_opt::data::{LabelMap, Preprocessing};
use cresnet_opt::fixture::{resnet50, FixtureSpec, Rng};
use std::path::{Path, PathBuf};

/// A 10-class fixture and an image folder holding 3 of its classes.
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    classes: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    let spec = FixtureSpec { width_div: 16, classes: 10, ..Default::default() };
    cresnet_opt::io::save(&resnet50(&spec).unwrap(), &model, false).unwrap();
    let classes = dir.path().join("classes.txt");
    std::fs::write(&classes, (0..10).map(|k| format!("n{k:03} class number {k}\n")).collect::<String>()).unwrap();
    let data = dir.path().join("data");
    let mut rng = Rng::new(1);
    for class in ["n002", "n005", "n007"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..3 {
            let img = image::RgbImage::from_fn(48 + 8 * i, 40, |_, _| {
                image::Rgb([rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8])
            });
            img.save(data.join(class).join(format!("img{i}.png"))).unwrap();
        }
    }
    Setup { dir, model, data, classes }
}

fn check(s: &Setup, extra: &[&str]) -> std::process::Output {
    bin().arg("check").arg(&s.model).args(["--format", "json", "--quiet"]).args(extra).output().unwrap()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn a_folder_set_with_some_classes_maps_through_the_class_list() {
    let s = setup();
    let v = json(&check(&s, &["--data", p(&s.data), "--classes", p(&s.classes), "--reference", p(&s.model)]));
    assert_eq!(v["images"], 9);
    assert_eq!(v["agreement"], 1.0);
    assert_eq!(v["model"], v["reference"]);
    // The score matches a direct evaluation with labels 2, 5, 7.
    let model = cresnet_opt::io::load(&s.model).unwrap();
    let runner = cresnet_opt::runner::Runner::new(&model, 1, &[]).unwrap();
    let pre = Preprocessing::caffe();
    let mut hits = 0;
    for (class, label) in [("n002", 2), ("n005", 5), ("n007", 7)] {
        for i in 0..3 {
            let x = pre.load(&s.data.join(class).join(format!("img{i}.png"))).unwrap().insert_axis(ndarray::Axis(0)).into_dyn();
            let y = runner.run(x).unwrap().remove(0);
            hits += usize::from(cresnet_opt::evaluate::top_k(y.as_slice().unwrap(), 1)[0] == label);
        }
    }
    assert_eq!(v["model"]["top1"].as_f64().unwrap(), hits as f64 / 9.0);
}

#[test]
fn without_a_class_list_folder_count_must_match_outputs() {
    let s = setup();
    let o = check(&s, &["--data", p(&s.data)]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has 3 class folders but the model has 10 outputs: pass --classes FILE"), "{err}");
}

#[test]
fn a_folder_missing_from_the_class_list_is_named() {
    let s = setup();
    std::fs::create_dir_all(s.data.join("n999")).unwrap();
    let o = check(&s, &["--data", p(&s.data), "--classes", p(&s.classes)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("class folder `n999`"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn label_map_scores_by_the_best_mapped_output() {
    let map_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-label-map.yaml");
    std::fs::write(&map_path, "n002: [0-2]\nn005: [5, 9]\nn007: ['6-8']\n").unwrap();
    let map = LabelMap::load(&map_path, 10).unwrap();
    assert_eq!(map.classes[0].1, vec![0, 1, 2]);
    assert_eq!(map.classes[2].1, vec![6, 7, 8]);
    let logits = [0.0, 3.0, 0.0, 9.0, 0.0, 1.0, 0.0, 0.0, 2.5, 4.0];
    assert_eq!(map.scores(&logits), vec![3.0, 4.0, 2.5], "output 3 belongs to no class and is ignored");
    let s = setup();
    let lm = s.dir.path().join("map.yaml");
    std::fs::copy(&map_path, &lm).unwrap();
    let v = json(&check(&s, &["--data", p(&s.data), "--label-map", p(&lm)]));
    assert_eq!(v["images"], 9);
    assert_eq!(v["model"]["top5"], 1.0, "three classes are always in the top 5");
    std::fs::write(&lm, "n002: [0-20]\n").unwrap();
    let o = check(&s, &["--data", p(&s.data), "--label-map", p(&lm)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("names output 10, but the model has 10"));
}

#[test]
fn presets_produce_the_documented_values() {
    let img = image::RgbImage::from_pixel(256, 300, image::Rgb([255, 0, 51]));
    let caffe = Preprocessing::caffe().apply(&img);
    assert_eq!(caffe.shape(), &[3, 224, 224]);
    let at = |a: &ndarray::Array3<f32>, c: usize| a[[c, 100, 100]];
    assert!((at(&caffe, 0) - (51.0 - 103.939)).abs() < 1e-4, "channel 0 is blue");
    assert!((at(&caffe, 2) - (255.0 - 123.68)).abs() < 1e-4, "channel 2 is red");
    let torch = Preprocessing::torch().apply(&img);
    assert!((at(&torch, 0) - (1.0 - 0.485) / 0.229).abs() < 1e-4, "channel 0 is red");
    assert!((at(&torch, 1) - (0.0 - 0.456) / 0.224).abs() < 1e-4);
}

#[test]
fn preprocess_yaml_file() {
    let s = setup();
    let pp = s.dir.path().join("pre.yaml");
    std::fs::write(&pp, "resize: 256\ncrop: 224\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\nscale: 0.00392156862\nchannel_order: rgb\n")
        .unwrap();
    let v = json(&check(&s, &["--data", p(&s.data), "--classes", p(&s.classes), "--preprocess", p(&pp)]));
    assert_eq!(v["images"], 9);
    std::fs::write(&pp, "resize: 256\ncrop: 224\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\nscale: 1\nchannel_order: rgb\nflip: true\n")
        .unwrap();
    let o = check(&s, &["--data", p(&s.data), "--classes", p(&s.classes), "--preprocess", p(&pp)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown field `flip`"));
}

#[test]
fn thresholds_fail_with_exit_1_and_name_the_threshold() {
    let s = setup();
    let other = s.dir.path().join("other.onnx");
    let spec = FixtureSpec { width_div: 16, classes: 10, seed: 9, ..Default::default() };
    cresnet_opt::io::save(&resnet50(&spec).unwrap(), &other, false).unwrap();
    let o = check(&s, &["--data", p(&s.data), "--classes", p(&s.classes), "--reference", p(&other), "--min-agreement", "1.01"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("threshold violated: agreement"), "{err}");
    assert!(err.contains("below 1.01"), "{err}");
}

#[test]
fn corrupt_image_and_missing_folder_are_errors() {
    let s = setup();
    std::fs::write(s.data.join("n005").join("broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let o = check(&s, &["--data", p(&s.data), "--classes", p(&s.classes)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot decode image"), "{}", String::from_utf8_lossy(&o.stderr));
    let missing = s.dir.path().join("nowhere");
    let o = check(&s, &["--data", p(&missing), "--classes", p(&s.classes)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    let empty = s.dir.path().join("empty");
    std::fs::create_dir_all(empty.join("n001")).unwrap();
    let o = check(&s, &["--data", p(&empty), "--classes", p(&s.classes)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no images"), "{}", String::from_utf8_lossy(&o.stderr));
}
