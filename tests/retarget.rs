//! The `retarget` pass and command: a task model from a classifier and labelled photos.
mod common;
use common::*;
use cresnet_opt::fixture::{resnet50, FixtureSpec, Rng};
use cresnet_opt::passes::retarget::RetargetOptions;
use cresnet_opt::passes::PassSpec;
use std::path::Path;

/// `count` photos per class in `dir/<class>/`: class k is tinted towards channel k.
fn write_classes(dir: &Path, classes: &[&str], count: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    for (k, class) in classes.iter().enumerate() {
        let folder = dir.join(class);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..count {
            let (a, b, c) = (rng.uniform() * 0.3, rng.uniform() * 0.3, rng.uniform() * 6.0);
            let img = image::RgbImage::from_fn(80, 72, |x, y| {
                let wave = 60.0 * (a * x as f32 + b * y as f32 + c).sin();
                let v = |ch: usize| (if ch == k { 170.0 } else { 90.0 } + wave).clamp(0.0, 255.0) as u8;
                image::Rgb([v(0), v(1), v(2)])
            });
            img.save(folder.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

fn setup(dir: &Path) -> (std::path::PathBuf, RetargetOptions) {
    let model = resnet50(&FixtureSpec { width_div: 8, input_size: 64, classes: 10, ..Default::default() }).unwrap();
    let path = dir.join("imagenet.onnx");
    cresnet_opt::io::save(&model, &path, false).unwrap();
    write_classes(&dir.join("train"), &["red", "green", "blue"], 12, 3);
    // The class list's order, not the folders', sets the outputs.
    std::fs::write(dir.join("classes.txt"), "blue\nred the first folder\ngreen\n").unwrap();
    let opts = RetargetOptions {
        data: dir.join("train"),
        classes: dir.join("classes.txt"),
        preprocess: preprocess_file(dir),
        folds: 3,
        ..Default::default()
    };
    (path, opts)
}

#[test]
fn retarget_fits_a_classifier_whose_output_k_is_line_k_of_the_class_list() {
    let dir = tempfile::tempdir().unwrap();
    let (path, opts) = setup(dir.path());
    let mut model = cresnet_opt::io::load(&path).unwrap();
    let reports = run_passes(&mut model, &[PassSpec::Retarget(opts)]);
    let r = reports.iter().find(|r| r.pass == "retarget").unwrap();
    assert_eq!(r.changed.iter().filter(|c| c.what.contains("-fold CV accuracy")).count(), 9, "{:?}", r.changed);
    let last = &r.changed.last().unwrap().what;
    assert!(last.starts_with("classifier for 3 classes fitted on 36 photos (256 features)"), "{last}");
    // Every training photo of class c gets output classes.txt's line of c.
    let pre = cresnet_opt::data::Preprocessing::from_choice(&preprocess_file(dir.path())).unwrap();
    for (class, k) in [("blue", 0), ("red", 1), ("green", 2)] {
        let paths = cresnet_opt::data::list_images(&dir.path().join("train").join(class)).unwrap();
        let images: Vec<_> = paths.iter().map(|p| pre.load(p).unwrap()).collect();
        let x = cresnet_opt::data::stack(&images, images.len()).into_dyn();
        let y = run(&model, &x);
        assert_eq!(y.shape(), &[images.len(), 3]);
        let hits = y.rows().into_iter().filter(|row| cresnet_opt::evaluate::top_k(row.as_slice().unwrap(), 1)[0] == k).count();
        assert!(hits >= images.len() - 1, "{class}: {hits} of {} right", images.len());
    }
}

/// `distill` on the photos of `setup` as unlabelled images: 1 epoch, batch 4, 2 threads.
fn distill_on_photos(dir: &Path) -> cresnet_opt::passes::distill::DistillOptions {
    cresnet_opt::passes::distill::DistillOptions {
        data: vec![cresnet_opt::config::DataSource { dir: dir.join("train"), images: None, classes: None }],
        preprocess: Some(preprocess_file(dir)),
        epochs: 1,
        batch: 4,
        threads: Some(2),
        ..Default::default()
    }
}

#[test]
fn a_pipeline_that_starts_with_retarget_distills_from_the_task_model() {
    let dir = tempfile::tempdir().unwrap();
    let (path, opts) = setup(dir.path());
    let mut model = cresnet_opt::io::load(&path).unwrap();
    let passes = [PassSpec::Retarget(opts), fold(), dw(1), PassSpec::Distill(distill_on_photos(dir.path()))];
    // A 1000-class teacher could not teach a 3-class student: this runs only with the retargeted one.
    let reports = run_passes(&mut model, &passes);
    assert!(!reports.last().unwrap().changed.is_empty());
}

#[test]
fn retarget_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (path, opts) = setup(dir.path());
    std::fs::write(dir.path().join("short.txt"), "blue\nred\n").unwrap();
    let out = dir.path().join("task.onnx");
    let o = bin()
        .arg("retarget")
        .arg(&path)
        .arg("--data")
        .arg(&opts.data)
        .arg("--classes")
        .arg(dir.path().join("short.txt"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("class folder `green`") && err.contains("is not in the class list"), "{err}");
    assert!(!out.exists());
    let mut bad = opts.clone();
    bad.folds = 1;
    let e = PassSpec::Retarget(bad).check().unwrap_err().to_string();
    assert!(e.contains("`retarget.folds` is 1, but must be at least 2"), "{e}");
}

#[test]
fn balanced_selection_takes_the_classes_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    write_classes(dir.path(), &["a", "b"], 3, 1);
    std::fs::write(dir.path().join("c.txt"), "a\nb\n").unwrap();
    let samples = cresnet_opt::data::labelled(dir.path(), Some(&dir.path().join("c.txt")), 2).unwrap();
    let picked = cresnet_opt::passes::retarget::balanced(samples, Some(2));
    let labels: Vec<usize> = picked.iter().map(|s| s.label).collect();
    assert_eq!(labels, [0, 1, 0, 1]);
}

#[test]
fn label_loss_gradient_matches_finite_differences() {
    let mut rng = Rng::new(5);
    let s: Vec<f32> = (0..12).map(|_| 2.0 * rng.normal()).collect();
    let labels = [Some(2), None, Some(0)];
    let (loss, grad) = cresnet_opt::train::distill::label_loss(&s, &labels, 4, 0.7);
    assert!(loss > 0.0);
    assert!(grad[4..8].iter().all(|&g| g == 0.0), "an unlabelled row adds nothing");
    for i in 0..s.len() {
        let eps = 1e-2;
        let (mut up, mut down) = (s.clone(), s.clone());
        up[i] += eps;
        down[i] -= eps;
        let l = |v: &[f32]| cresnet_opt::train::distill::label_loss(v, &labels, 4, 0.7).0;
        let numeric = (l(&up) - l(&down)) / (2.0 * eps as f64);
        assert!((numeric - grad[i] as f64).abs() < 1e-4, "logit {i}: analytic {} vs numeric {numeric}", grad[i]);
    }
}

#[test]
fn distill_with_labels_trains_on_them_and_keeps_the_best_top1() {
    let dir = tempfile::tempdir().unwrap();
    let (path, opts) = setup(dir.path());
    let mut model = cresnet_opt::io::load(&path).unwrap();
    let distill = cresnet_opt::passes::distill::DistillOptions {
        data: vec![cresnet_opt::config::DataSource {
            dir: dir.path().join("train"),
            images: None,
            classes: Some(dir.path().join("classes.txt")),
        }],
        preprocess: Some(preprocess_file(dir.path())),
        epochs: 2,
        batch: 4,
        lr: 1e-3,
        label_weight: 1.0,
        holdout: 0.25,
        threads: Some(2),
        ..Default::default()
    };
    let reports = run_passes(&mut model, &[PassSpec::Retarget(opts), fold(), dw(1), PassSpec::Distill(distill)]);
    let log: Vec<&str> = reports.last().unwrap().changed.iter().map(|c| c.what.as_str()).collect();
    assert!(log[0].starts_with("epoch 0 (before training): hold-out top-1"), "{log:?}");
    let kept = log.last().unwrap();
    // 36 photos, 3 classes: 3 of each class held out (stratified), 27 trained on.
    assert!(
        kept.starts_with("kept epoch") && kept.contains("hold-out top-1") && kept.contains("27 training / 9 hold-out images"),
        "{kept}"
    );
}

#[test]
fn a_labelled_source_picks_its_images_class_by_class() {
    let dir = tempfile::tempdir().unwrap();
    write_classes(dir.path(), &["a", "b", "c"], 4, 2);
    std::fs::write(dir.path().join("classes.txt"), "c\nb\na\n").unwrap();
    let source =
        cresnet_opt::config::DataSource { dir: dir.path().to_path_buf(), images: Some(5), classes: Some(dir.path().join("classes.txt")) };
    let labels: Vec<Option<usize>> = source.samples().unwrap().into_iter().map(|(_, l)| l).collect();
    // Folders a, b, c = outputs 2, 1, 0; taken in turn in output order.
    assert_eq!(labels, [Some(0), Some(1), Some(2), Some(0), Some(1)]);
    let unlabelled = cresnet_opt::config::DataSource { dir: dir.path().to_path_buf(), images: Some(5), classes: None };
    let paths = unlabelled.paths().unwrap();
    assert!(paths.iter().all(|p| p.parent().unwrap().ends_with("a") || p.parent().unwrap().ends_with("b")), "first 5 by path");
}

/// A 3-class task model (the fixture's backbone with a 3-way head), its
/// labelled photos (12 per class) and a pipeline file naming `cresnet` with
/// a labelled calibration of `images` photos.
fn task_setup(dir: &Path, images: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = resnet50(&FixtureSpec { width_div: 8, input_size: 64, classes: 3, ..Default::default() }).unwrap();
    let path = dir.join("task.onnx");
    cresnet_opt::io::save(&model, &path, false).unwrap();
    write_classes(&dir.join("train"), &["red", "green", "blue"], 12, 3);
    std::fs::write(dir.join("classes.txt"), "blue\nred\ngreen\n").unwrap();
    let _ = preprocess_file(dir);
    let cfg = dir.join("cfg.yaml");
    std::fs::write(
        &cfg,
        format!("pipeline: cresnet\ncalibration: {{ data: train, classes: classes.txt, preprocess: pre.yaml, images: {images} }}\n"),
    )
    .unwrap();
    (path, cfg)
}

fn report_of(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn pass<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["passes"].as_array().unwrap().iter().find(|p| p["pass"] == name).unwrap()
}

fn changes(pass: &serde_json::Value) -> Vec<String> {
    pass["changed"].as_array().unwrap().iter().map(|c| c["what"].as_str().unwrap().to_string()).collect()
}

#[test]
fn the_cresnet_pipeline_runs_its_task_recipe_on_a_task_model() {
    let dir = tempfile::tempdir().unwrap();
    let (path, cfg) = task_setup(dir.path(), 12);
    let (out, report) = (dir.path().join("small.onnx"), dir.path().join("r.json"));
    let o = bin().arg(&path).arg("-o").arg(&out).arg("--config").arg(&cfg).arg("--report").arg(&report).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("note: pipeline `cresnet`: the model has 3 classes (at most 100): running its task recipe `cresnet-task`"),
        "{err}"
    );
    // The file's `images: 12` wins over the recipe's 512.
    assert!(err.contains("calibration: 12 images for the refits (12 asked of"), "{err}");
    let r = report_of(&report);
    let names: Vec<&str> = r["passes"].as_array().unwrap().iter().map(|p| p["pass"].as_str().unwrap()).collect();
    assert_eq!(names, ["fold", "lowrank", "dw", "dw", "retarget", "subsample"]);
    assert!(r["params_after"].as_f64().unwrap() <= 0.2 * r["params_before"].as_f64().unwrap(), "{}", r["params_after"]);
    // The refits use the first 12 photos (class-balanced); the head is refit
    // on every labelled photo.
    let head = changes(pass(&r, "retarget"));
    assert!(head.last().unwrap().starts_with("classifier for 3 classes fitted on 36 photos"), "{head:?}");
    // Every 3x3 conv is factorized (the first `dw`); the strided 1x1 convs
    // of stages 3-5 (conv and shortcut) read subsampled maps.
    assert_eq!(pass(&r, "dw")["changed"].as_array().unwrap().len(), 16);
    assert_eq!(pass(&r, "subsample")["changed"].as_array().unwrap().len(), 6);
    let small = cresnet_opt::io::load(&out).unwrap();
    let y = run(&small, &random_input(&small, 2, 50.0, 1));
    assert_eq!(y.shape(), &[2, 3]);
}

#[test]
fn the_task_recipe_without_labelled_photos_runs_data_free_and_says_what_it_could_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = task_setup(dir.path(), 12);
    let (out, report) = (dir.path().join("small.onnx"), dir.path().join("r.json"));
    let o = bin().arg(&path).arg("-o").arg(&out).args(["--pipeline", "cresnet", "--report"]).arg(&report).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("running its task recipe `cresnet-task`"), "{err}");
    assert!(err.contains("warning: pass `retarget` changed nothing (1 declined; first: `(classifier)`: no labelled photos"), "{err}");
    let r = report_of(&report);
    assert!(r["params_after"].as_f64().unwrap() <= 0.2 * r["params_before"].as_f64().unwrap());
}

#[test]
fn a_model_with_many_classes_keeps_the_imagenet_recipe() {
    assert_eq!(cresnet_opt::config::pipeline_for("cresnet", Some(6)), "cresnet-task");
    assert_eq!(cresnet_opt::config::pipeline_for("cresnet", Some(100)), "cresnet-task");
    assert_eq!(cresnet_opt::config::pipeline_for("cresnet", Some(101)), "cresnet");
    assert_eq!(cresnet_opt::config::pipeline_for("cresnet", Some(1000)), "cresnet");
    assert_eq!(cresnet_opt::config::pipeline_for("cresnet", None), "cresnet");
    assert_eq!(cresnet_opt::config::pipeline_for("fold", Some(6)), "fold");
}

/// A shipped recipe's `calibration_defaults` fill the keys the user's
/// `calibration:` leaves out; a key the user wrote wins, and so do the
/// defaults of the user's own file.
#[test]
fn the_task_recipes_calibration_defaults_fill_only_what_the_user_left_out() {
    use cresnet_opt::config::{shipped_pipeline, PipelineFile};
    let recipe = shipped_pipeline("cresnet-task").unwrap().calibration_defaults;
    assert_eq!(recipe.and_then(|d| d.images), Some(512));
    assert_eq!(shipped_pipeline("cresnet").unwrap().calibration_defaults, None);
    let user = |text: &str| PipelineFile::from_yaml(text, "cfg.yaml").unwrap();
    let bare = user("pipeline: cresnet\ncalibration: { data: train, classes: c.txt }\n");
    assert_eq!(bare.calibration.as_ref().unwrap().images, 256, "built-in default before the recipe is known");
    let cal = bare.calibration_with(recipe).unwrap();
    assert_eq!((cal.images, cal.positions), (512, 32));
    let written = user("pipeline: cresnet\ncalibration: { data: train, images: 64 }\n");
    assert_eq!(written.calibration_with(recipe).unwrap().images, 64);
    let own = user("pipeline: cresnet\ncalibration: { data: train }\ncalibration_defaults: { positions: 8, ridge: 0.5 }\n");
    let cal = own.calibration_with(recipe).unwrap();
    assert_eq!((cal.images, cal.positions, cal.ridge), (512, 8, 0.5));
    assert_eq!(own.calibration_with(None).unwrap().images, 256);
    let err = PipelineFile::from_yaml("calibration_defaults: { images: 0 }\n", "cfg.yaml").unwrap_err().to_string();
    assert!(err.contains("cfg.yaml: calibration_defaults needs images and positions of at least 1"), "{err}");
    // A file with passes of its own runs them, not a recipe: no recipe defaults.
    let own_passes = user("pipeline: cresnet-task\npasses: [fold]\ncalibration: { data: train }\n");
    assert_eq!(own_passes.shipped(), None);
    let err = PipelineFile::from_yaml("calibration_defaults: { data: x }\n", "cfg.yaml").unwrap_err().to_string();
    assert!(err.contains("unknown field `data`"), "{err}");
}

/// distill with `views: 1`: the teacher runs on each training image once
/// (epoch 1) and its logits are reused in epoch 2; without views it runs
/// on every image of every epoch.
#[test]
fn distill_views_reuse_the_teachers_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (path, opts) = setup(dir.path());
    let taught = |views: Option<usize>| -> Vec<String> {
        let mut model = cresnet_opt::io::load(&path).unwrap();
        let distill = cresnet_opt::passes::distill::DistillOptions {
            data: vec![cresnet_opt::config::DataSource { dir: dir.path().join("train"), images: None, classes: None }],
            preprocess: Some(preprocess_file(dir.path())),
            epochs: 2,
            batch: 4,
            holdout: 0.0,
            views,
            threads: Some(2),
            ..Default::default()
        };
        let reports = run_passes(&mut model, &[PassSpec::Retarget(opts.clone()), fold(), dw(1), PassSpec::Distill(distill)]);
        let log: Vec<String> = reports.last().unwrap().changed.iter().map(|c| c.what.clone()).collect();
        log.iter()
            .filter(|l| l.starts_with("epoch ") && !l.starts_with("epoch 0"))
            .map(|l| l.split("s on ").nth(1).unwrap().to_string())
            .collect()
    };
    // 36 images, batch 4: 9 steps of 4 = every image once per epoch.
    let cached = taught(Some(1));
    assert!(cached[0].starts_with("36 images") && cached[1].starts_with("0 images"), "{cached:?}");
    let fresh = taught(None);
    assert!(fresh[0].starts_with("36 images") && fresh[1].starts_with("36 images"), "{fresh:?}");
}

#[test]
fn prune_target_params_above_one_is_a_weight_count() {
    let mut model = cresnet_opt::io::load(&fixture_path()).unwrap();
    let opts = cresnet_opt::passes::prune::PruneOptions { target_params: Some(150_000.0), ..Default::default() };
    let reports = run_passes(&mut model, &[fold(), prune(opts)]);
    let after = reports.last().unwrap().params_after;
    assert!((145_000..=150_000).contains(&after), "{after} weights");
    for bad in [1.5, f64::INFINITY] {
        let spec = prune(cresnet_opt::passes::prune::PruneOptions { target_params: Some(bad), ..Default::default() });
        let e = spec.check().unwrap_err().to_string();
        assert!(e.contains("a share in (0, 1] or a whole number of weights"), "{bad}: {e}");
    }
}

/// `prune: {budget}` is a share of the weights the pipeline started with,
/// not of its own input: after `dw` removed weights, `budget: 0.3` still
/// lands at (just under) 30 % of the folded model's weights, and says so.
#[test]
fn prune_budget_is_a_share_of_the_pipelines_start() {
    use cresnet_opt::passes::prune::PruneOptions;
    let mut model = cresnet_opt::io::load(&fixture_path()).unwrap();
    let budget = |b: f64| prune(PruneOptions { budget: Some(b), ..Default::default() });
    let reports = run_passes(&mut model, &[fold(), dw(1), budget(0.3)]);
    let start = reports.iter().find(|r| r.pass == "fold").unwrap().params_before;
    let after = reports.last().unwrap().params_after;
    let limit = (0.3 * start as f64).floor() as u64;
    assert!(after <= limit && after as f64 >= 0.97 * limit as f64, "{after} of {start} weights, limit {limit}");
    let note = &reports.last().unwrap().changed[0];
    assert_eq!(note.node, "(budget)");
    assert!(note.what.starts_with("budget 30.00 % of ") && note.what.contains(&format!("keeps {after} ")), "{}", note.what);
    for (spec, msg) in [
        (budget(1.5), "`prune.budget` is 1.5, but must lie strictly between 0 and 1"),
        (
            prune(PruneOptions { budget: Some(0.2), ratio: Some(0.5), ..Default::default() }),
            "`prune` takes only one of `ratio`, `target_macs`, `target_params`, `budget`",
        ),
    ] {
        let e = spec.check().unwrap_err().to_string();
        assert!(e.contains(msg), "{e}");
    }
}

/// The same command on a task model made elsewhere: torch's dynamo export
/// of a ResNet-18 with a 10-way head (ReduceMean + Reshape head, value_info
/// everywhere), 10 labelled classes of 6 photos.
#[test]
fn a_task_model_from_another_exporter_takes_the_same_command() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..10).map(|k| format!("class{k}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    write_classes(&dir.path().join("train"), &refs, 6, 4);
    std::fs::write(dir.path().join("classes.txt"), names.join("\n") + "\n").unwrap();
    let _ = preprocess_file(dir.path());
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(&cfg, "pipeline: cresnet\ncalibration: { data: train, classes: classes.txt, preprocess: pre.yaml }\n").unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/exports/resnet18-dynamo-op18.onnx");
    let (out, report) = (dir.path().join("small.onnx"), dir.path().join("r.json"));
    let o = bin().arg(&model).arg("-o").arg(&out).arg("--config").arg(&cfg).arg("--report").arg(&report).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("the model has 10 classes (at most 100): running its task recipe `cresnet-task`"), "{err}");
    // The recipe asks for 512 refit photos (the file says nothing); the folder has 60.
    assert!(err.contains("calibration: 60 images for the refits (512 asked of") && err.contains("), 32 positions"), "{err}");
    let r = report_of(&report);
    assert!(r["params_after"].as_f64().unwrap() <= 0.2 * r["params_before"].as_f64().unwrap(), "{}", r["params_after"]);
    let head = changes(pass(&r, "retarget"));
    assert!(head.last().unwrap().starts_with("classifier for 10 classes fitted on 60 photos"), "{head:?}");
    let small = cresnet_opt::io::load(&out).unwrap();
    assert_eq!(run(&small, &random_input(&small, 1, 1.0, 2)).shape(), &[1, 10]);
    // A class list that is not the model's own: the head refit says so, and nothing is written.
    std::fs::write(dir.path().join("classes.txt"), names[..9].join("\n") + "\n").unwrap();
    std::fs::remove_dir_all(dir.path().join("train/class9")).unwrap();
    std::fs::remove_file(&out).unwrap();
    let o = bin().arg(&model).arg("-o").arg(&out).arg("--config").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("has 9 classes, but the model has 10 outputs"), "{err}");
    assert!(!out.exists());
}

/// `teacher_at_model_size`: the teacher labels the training views at the
/// model's own size. A model distilled from itself agrees with a teacher
/// that sees its own 48-px input (KL 0 before training), not with one that
/// sees the same views at 64 px.
#[test]
fn the_teacher_can_see_the_views_at_the_models_size() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = setup(dir.path());
    let kl_before_training = |at_model_size: bool| -> f64 {
        let mut model = cresnet_opt::io::load(&path).unwrap();
        let distill = cresnet_opt::passes::distill::DistillOptions {
            lr: 1e-12,
            holdout: 0.25,
            resolution: Some(48),
            teacher_at_model_size: at_model_size,
            ..distill_on_photos(dir.path())
        };
        let reports = run_passes(&mut model, &[fold(), PassSpec::Distill(distill)]);
        let log: Vec<String> = reports.last().unwrap().changed.iter().map(|c| c.what.clone()).collect();
        let line = log.iter().find(|l| l.starts_with("epoch 0")).unwrap();
        line.split("KL ").nth(1).unwrap().trim().parse().unwrap()
    };
    assert!(kl_before_training(false) < 1e-4);
    let kl = kl_before_training(true);
    assert!(kl > 1e-3, "{kl}");
}

/// Progressive resizing (`resolution_from`): the epochs at smaller sizes
/// train a second student whose weights go back to the full-size one, and
/// the teacher labels each view once, at `resolution`. A model distilled
/// from itself at lr ~0 stays itself at every epoch (KL 0 on the hold-out,
/// scored at the full training size); at lr 1e-3 the first, smallest epoch
/// already changes it.
#[test]
fn progressive_resizing_trains_the_same_weights_at_smaller_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = setup(dir.path());
    let log_of = |lr: f64| -> Vec<String> {
        let mut model = cresnet_opt::io::load(&path).unwrap();
        let distill = cresnet_opt::passes::distill::DistillOptions {
            lr,
            epochs: 4,
            holdout: 0.25,
            views: Some(1),
            resolution: Some(48),
            resolution_from: Some(24),
            ..distill_on_photos(dir.path())
        };
        let reports = run_passes(&mut model, &[fold(), PassSpec::Distill(distill)]);
        reports.last().unwrap().changed.iter().map(|c| c.what.clone()).collect()
    };
    let epoch_kl = |line: &str| -> f64 { line.split("KL ").nth(1).unwrap().split(';').next().unwrap().trim().parse().unwrap() };
    let still = log_of(1e-12);
    assert!(still.iter().any(|l| l == "progressive resizing, px by epoch: 24 32 48 48"), "{still:?}");
    let epochs: Vec<&String> = still.iter().filter(|l| l.starts_with("epoch ") && !l.starts_with("epoch 0")).collect();
    assert_eq!(epochs.len(), 4, "{still:?}");
    let mut taught = 0;
    for line in &epochs {
        assert!(epoch_kl(line) < 1e-4, "{line}");
        taught += line.split("s on ").nth(1).unwrap().split(' ').next().unwrap().parse::<usize>().unwrap();
    }
    // 27 training images (9 held out), batch 4: 24 per epoch, each labelled at most once.
    assert!((24..=27).contains(&taught), "{taught} images labelled: {epochs:?}");
    let trained = log_of(1e-3);
    let first = trained.iter().find(|l| l.starts_with("epoch 1/4")).unwrap();
    assert!(epoch_kl(first) > 1e-5, "{first}");
    let spec = |from: usize, to: Option<usize>| {
        let o = cresnet_opt::passes::distill::DistillOptions { resolution_from: Some(from), resolution: to, ..Default::default() };
        PassSpec::Distill(o).check().unwrap_err().to_string()
    };
    assert!(spec(96, None).contains("`distill.resolution_from` needs `distill.resolution`"), "{}", spec(96, None));
    assert!(spec(192, Some(160)).contains("`distill.resolution_from` is 192, but must lie in [8, resolution = 160]"));
}

/// Calibration keeps 8-bit crops and makes tensors when the refits read
/// them (issue #18): the very values `check` feeds the model, taken class
/// by class in turn.
#[test]
fn calibration_images_are_the_preprocessed_photos() {
    let dir = tempfile::tempdir().unwrap();
    write_classes(&dir.path().join("train"), &["red", "green", "blue"], 3, 5);
    std::fs::write(dir.path().join("classes.txt"), "blue\nred\ngreen\n").unwrap();
    let pre = preprocess_file(dir.path());
    let cfg = cresnet_opt::config::Calibration {
        classes: Some(dir.path().join("classes.txt")),
        images: 4,
        preprocess: pre.clone(),
        ..yaml_calibration(&dir.path().join("train"))
    };
    let calib = cresnet_opt::refit::Calibration::load(&cfg).unwrap();
    assert_eq!(calib.images.len(), 4);
    let expected = cresnet_opt::data::Preprocessing::from_choice(&pre).unwrap();
    for (i, name) in ["blue/000.png", "red/000.png", "green/000.png", "blue/001.png"].iter().enumerate() {
        let want = expected.load(&dir.path().join("train").join(name)).unwrap();
        assert_eq!(calib.images.get(i), want, "image {i}: {name}");
    }
}

fn yaml_calibration(data: &Path) -> cresnet_opt::config::Calibration {
    yaml_serde::from_str(&format!("data: {}\n", data.display())).unwrap()
}
