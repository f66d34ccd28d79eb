//! A short real fine-tune on tiny inputs: the MNI152 T1 (1 and 2 mm) with
//! its brain mask, resampled by the runtime's preprocessing to 8 mm, and a
//! tiny ViT. The loss must fall and the run must leave its artefacts.

use std::path::{Path, PathBuf};

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_core::segment::Segmenter;
use infl8_trainer::import::save_vit2d;
use infl8_trainer::train::config::TrainConfig;
use infl8_trainer::train::finetune;
use infl8_trainer::train::runtime_model::BurnModel;
use infl8_trainer::vit::{Vit2d, VitConfig};

fn mni(file: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/data/mni152")
        .join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-data.sh",
        p.display()
    );
    p
}

fn link_case(dir: &Path, id: &str, res: &str) {
    let image = mni(&format!("tpl-MNI152NLin6Asym_res-{res}_T1w.nii.gz"));
    let label = mni(&format!(
        "tpl-MNI152NLin6Asym_res-{res}_desc-brain_mask.nii.gz"
    ));
    std::fs::copy(image, dir.join(format!("{id}_image.nii.gz"))).unwrap();
    // The mask is stored as float: rewrite it as uint8 labels.
    let v = nifti_io::read_volume(&label, &ReadLimits::default()).unwrap();
    let labels = v
        .data
        .index_axis(ndarray::Axis(0), 0)
        .mapv(|x| u8::from(x > 0.5));
    nifti_io::write_labels(&dir.join(format!("{id}_label.nii.gz")), labels.view(), &v).unwrap();
}

/// Data, a tiny ViT and a config in `dir`; returns the config's path.
fn setup(dir: &Path, steps: usize, val_every: usize) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    link_case(&data, "mni2mm", "02");
    link_case(&data, "mni1mm", "01");
    let vit = dir.join("vit.safetensors");
    save_vit2d(
        &vit,
        &Vit2d::random(
            VitConfig {
                patch: 4,
                width: 16,
                depth: 2,
                heads: 2,
                mlp: 32,
                in_chans: 3,
                grid: [4, 4],
                cls_token: true,
                layer_scale: true,
                eps: 1e-6,
            },
            5,
        ),
    )
    .unwrap();
    let cfg_path = dir.join("train.toml");
    std::fs::write(
        &cfg_path,
        r#"
[data]
dir = "data"
validation_fraction = 0.5
split_seed = 1

[model]
vit = "vit.safetensors"
shape = { kind = "slab", depth = 3 }
roi = [16, 16]
features = 4

[preprocess]
target_spacing = [8.0, 8.0, 8.0]
normalization = { kind = "percentile", lo = 1.0, hi = 99.0 }

[train]
steps = STEPS
batch = 4
lr = 2e-3
warmup = 4
val_every = VAL_EVERY
seed = 3
fg_prob = 1.0
out = "run"
"#
        .replace("STEPS", &steps.to_string())
        .replace("VAL_EVERY", &val_every.to_string()),
    )
    .unwrap();
    cfg_path
}

#[test]
fn a_short_finetune_lowers_the_loss_and_writes_its_artefacts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::load(&setup(dir.path(), 80, 40)).unwrap();
    let s = finetune(&cfg, &burn::tensor::Device::default(), false).unwrap();

    let csv = std::fs::read_to_string(dir.path().join("run/metrics.csv")).unwrap();
    let losses: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 80);
    let first: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = losses[70..].iter().sum::<f64>() / 10.0;
    assert!(last < 0.85 * first, "loss {first:.4} -> {last:.4}");
    assert_eq!(s.train_cases.len(), 1);
    assert_eq!(s.validation_cases.len(), 1);
    for f in ["best.safetensors", "last.safetensors", "validation.json"] {
        assert!(dir.path().join("run").join(f).is_file(), "{f}");
    }
    // The best Dice is the best of the validations the run logged...
    let log: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/validation.json")).unwrap(),
    )
    .unwrap();
    let logged: Vec<f64> = log[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["mean_dice"].as_f64().unwrap())
        .collect();
    assert_eq!(logged.len(), 2, "{log}");
    assert_eq!(s.best_dice, logged.iter().copied().fold(f64::MIN, f64::max));
    // ...is what the saved best checkpoint scores on the validation case
    // when it segments it again here...
    let id = &s.validation_cases[0];
    let image = dir.path().join(format!("data/{id}_image.nii.gz"));
    let limits = ReadLimits::default();
    let truth: Vec<bool> =
        nifti_io::read_volume(&dir.path().join(format!("data/{id}_label.nii.gz")), &limits)
            .unwrap()
            .data
            .iter()
            .map(|v| *v > 0.5)
            .collect();
    let pred = segment_with_best(&dir.path().join("run/best.safetensors"), &image);
    assert_eq!(pred.len(), truth.len());
    let both = pred.iter().zip(&truth).filter(|(p, t)| **p && **t).count();
    let (np, nt) = (
        pred.iter().filter(|p| **p).count(),
        truth.iter().filter(|t| **t).count(),
    );
    let dice = 2.0 * both as f64 / (np + nt) as f64;
    assert!(
        (dice - s.best_dice).abs() < 1e-9,
        "re-measured {dice}, reported {}",
        s.best_dice
    );
    // ...and beats calling every voxel brain.
    let everything = 2.0 * nt as f64 / (nt + truth.len()) as f64;
    assert!(
        s.best_dice > everything,
        "Dice {} vs {everything} for all-brain",
        s.best_dice
    );
    // The checkpoint records how to run the model, so export needs no flags.
    let m = infl8_trainer::checkpoint::read_manifest(&dir.path().join("run/best.safetensors"))
        .unwrap()
        .unwrap();
    assert_eq!(m.labels, ["background", "foreground"]);
    assert_eq!(m.preprocess.target_spacing, Some([8.0, 8.0, 8.0]));
    assert!(matches!(
        m.preprocess.normalization,
        infl8_core::preprocess::Normalization::Percentile { .. }
    ));
}

/// The label map (foreground or not) that the
/// checkpoint at `ckpt` gives `image` through the runtime's segmenter.
fn segment_with_best(ckpt: &Path, image: &Path) -> Vec<bool> {
    let device = burn::tensor::Device::default();
    let manifest = infl8_trainer::checkpoint::read_manifest(ckpt)
        .unwrap()
        .unwrap();
    let model = infl8_trainer::checkpoint::load(ckpt, &device).unwrap();
    let segmenter = Segmenter::new(Box::new(BurnModel::new(model, device)), manifest, 4);
    let vol = nifti_io::read_volume(image, &ReadLimits::default()).unwrap();
    let seg = segmenter.segment(&vol, image, false, &|_, _| {}).unwrap();
    // [X, Y, Z] in logical order, as the label volume's data iterates.
    seg.labels.iter().map(|v| *v > 0).collect()
}

fn outputs(path: &Path) -> Vec<f32> {
    let device = burn::tensor::Device::default();
    let m = infl8_trainer::checkpoint::load(path, &device).unwrap();
    let mut shape = vec![1];
    shape.extend(m.config.input_item_shape());
    let n: usize = shape.iter().product();
    let x = burn::tensor::Tensor::<5>::from_data(
        burn::tensor::TensorData::new(
            (0..n).map(|i| (i as f32 * 0.1).sin()).collect::<Vec<f32>>(),
            <[usize; 5]>::try_from(shape).unwrap(),
        ),
        &device,
    );
    m.forward(x)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn a_resumed_run_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::load(&setup(dir.path(), 20, 10)).unwrap();
    let device = burn::tensor::Device::default();
    let full = finetune(&cfg, &device, false).unwrap();
    let run = dir.path().join("run");
    let last = run.join("last.safetensors");
    let want = outputs(&last);
    let csv_full = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert!(run.join("resume.json").is_file());

    // As if the process had died after step 10: resume from the snapshot.
    std::fs::remove_file(&last).unwrap();
    let resumed = infl8_trainer::train::resume(&cfg, &device, false).unwrap();
    let got = outputs(&last);
    let csv_resumed = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv_resumed, csv_full, "the metrics must repeat exactly");
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff == 0.0, "resumed weights differ: {diff}");
    assert_eq!(full.resumed_from, 0);
    assert_eq!(resumed.resumed_from, 10, "must continue from the snapshot");
    assert_eq!(resumed.last_loss, full.last_loss);
    assert_eq!(resumed.best_step, full.best_step);

    // A different run must not silently continue this one.
    let mut other = cfg.clone();
    other.model.features = 8;
    let e = infl8_trainer::train::resume(&other, &device, false).unwrap_err();
    assert!(e.to_string().contains("different"), "{e}");
    // So must one on other data variants: its training set differs.
    let mut other = cfg.clone();
    other.train.variants.per_case = 1;
    let e = infl8_trainer::train::resume(&other, &device, false).unwrap_err();
    assert!(e.to_string().contains("different"), "{e}");
}

#[test]
fn ablation_runs_every_arm_and_reports_mean_and_sd() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::load(&setup(dir.path(), 6, 3)).unwrap();
    let device = burn::tensor::Device::default();
    let inits = vec!["inflated".to_string(), "scratch".to_string()];
    let results =
        infl8_trainer::train::ablate::ablate(&cfg, &inits, &[0, 1], &device, false).unwrap();
    assert_eq!(results.len(), 4);
    let md = infl8_trainer::train::ablate::report(&results, &cfg, "infl8-train ablate ...");
    assert!(
        md.contains("| inflated | 2 |") && md.contains("| scratch | 2 |"),
        "{md}"
    );
    assert!(md.contains(" ± "), "{md}");
    let png = dir.path().join("ablation.png");
    infl8_trainer::train::ablate::plot(&results, &png).unwrap();
    assert!(png.is_file());
    assert!(dir.path().join("run/scratch-seed1/metrics.png").is_file());
}
