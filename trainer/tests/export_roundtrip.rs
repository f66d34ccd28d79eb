//! Export round trips: checkpoint save/load and ONNX export for both model
//! shapes, with tract checked against burn.

use burn::tensor::{Device, Tensor, TensorData};
use infl8_core::manifest;
use infl8_core::preprocess::{Normalization, PreprocessSpec};
use infl8_trainer::assemble::{BuildOptions, build};
use infl8_trainer::checkpoint;
use infl8_trainer::export::{RuntimeSpec, VERIFY_LIMIT, export, manifest_for, to_onnx, verify};
use infl8_trainer::inflate::{DepthRule, Init};
use infl8_trainer::model::{ModelShape, SegModel};
use infl8_trainer::vit::{Vit2d, VitConfig};

fn vit() -> Vit2d {
    Vit2d::random(
        VitConfig {
            patch: 4,
            width: 24,
            depth: 3,
            heads: 2,
            mlp: 48,
            in_chans: 3,
            grid: [4, 4],
            cls_token: true,
            layer_scale: true,
            eps: 1e-6,
        },
        9,
    )
}

fn model(shape: ModelShape, device: &Device) -> SegModel {
    let opts = BuildOptions {
        shape,
        roi_hw: [8, 12],
        in_channels: 2,
        classes: 3,
        features: 4,
        blocks: None,
        init: Init::Inflated(DepthRule::Centering),
    };
    build(&vit(), &opts, device).unwrap()
}

fn spec() -> RuntimeSpec {
    RuntimeSpec {
        name: Some("tiny".into()),
        labels: vec!["bg".into(), "a".into(), "b".into()],
        preprocess: PreprocessSpec {
            reorient: true,
            target_spacing: Some([2.0, 2.0, 2.0]),
            normalization: Normalization::Zscore { nonzero: true },
        },
        overlap: 0.25,
        postprocess: Default::default(),
    }
}

fn shapes() -> [ModelShape; 2] {
    [
        ModelShape::Slab { depth: 3 },
        ModelShape::Volumetric {
            tile_depth: 8,
            patch_depth: 4,
        },
    ]
}

fn output(m: &SegModel, device: &Device) -> Vec<f32> {
    let mut shape = vec![1];
    shape.extend(m.config.input_item_shape());
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).cos()).collect();
    let x = Tensor::<5>::from_data(
        TensorData::new(data, <[usize; 5]>::try_from(shape).unwrap()),
        device,
    );
    m.forward(x)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn checkpoints_round_trip_exactly() {
    let device = Device::default();
    let dir = tempfile::tempdir().unwrap();
    for shape in shapes() {
        let m = model(shape, &device);
        let path = dir.path().join("m.safetensors");
        checkpoint::save(&m, &path).unwrap();
        let back = checkpoint::load(&path, &device).unwrap();
        assert_eq!(back.config, m.config);
        assert_eq!(output(&back, &device), output(&m, &device));
    }
}

#[test]
fn onnx_export_matches_burn_for_both_shapes() {
    let device = Device::default();
    let dir = tempfile::tempdir().unwrap();
    for shape in shapes() {
        let m = model(shape.clone(), &device);
        let man = manifest_for(&m, &spec()).unwrap();
        let path = dir.path().join("m.onnx");
        let diff = export(&m, &man, &path).unwrap();
        assert!(diff <= VERIFY_LIMIT, "{shape:?}: {diff}");
        // The runtime finds the manifest and it fits the model's declared I/O.
        let (found, origin) = manifest::find(&path).unwrap().unwrap();
        assert_eq!(origin, manifest::ManifestOrigin::Metadata);
        assert_eq!(found, man);
        let onnx = infl8_onnx::read_model(&path).unwrap();
        let ins = infl8_onnx::inputs(&onnx);
        assert_eq!(ins.len(), 1);
        assert_eq!(ins[0].shape.as_ref().map(Vec::len), Some(5));
        // A second seed: still equal.
        assert!(verify(&m, &onnx, 3).unwrap() <= VERIFY_LIMIT);
    }
}

#[test]
fn a_graph_that_does_not_match_fails_the_export() {
    let device = Device::default();
    let dir = tempfile::tempdir().unwrap();
    let m = model(ModelShape::Slab { depth: 3 }, &device);
    let man = manifest_for(&m, &spec()).unwrap();
    let mut onnx = to_onnx(&m, &man).unwrap();
    // Corrupt one weight of the graph: the check must notice.
    let graph = onnx.graph.as_mut().unwrap();
    let t = graph
        .initializer
        .iter_mut()
        .find(|t| t.name == "decoder.head.bias")
        .unwrap();
    t.float_data.iter_mut().for_each(|v| *v += 0.5);
    if !t.raw_data.is_empty() {
        let mut vals: Vec<f32> = t
            .raw_data
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) + 0.5)
            .collect();
        t.raw_data = vals.iter_mut().flat_map(|v| v.to_le_bytes()).collect();
    }
    assert!(verify(&m, &onnx, 1).unwrap() > 0.4);
    // And a wrong label count is refused: by manifest_for, and by the
    // export itself, which then writes nothing.
    let mut bad = spec();
    bad.labels.pop();
    assert!(manifest_for(&m, &bad).unwrap_err().contains("3 classes"));
    let path = dir.path().join("m.onnx");
    let mut wrong = man.clone();
    wrong.labels.pop();
    let err = export(&m, &wrong, &path).unwrap_err().to_string();
    assert!(
        err.contains("2 labels") && err.contains("3 channels") && err.contains("m.onnx"),
        "{err}"
    );
    assert!(!path.exists(), "a refused export left {}", path.display());
    // The same call with the fitting manifest writes the model.
    assert!(export(&m, &man, &path).unwrap() <= VERIFY_LIMIT);
    assert_eq!(manifest::find(&path).unwrap().unwrap().0, man);
}

#[test]
fn corrupt_checkpoints_are_refused_with_the_file_name() {
    let device = Device::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let e = checkpoint::load(&path, &device).unwrap_err().to_string();
    assert!(e.contains("broken.safetensors"), "{e}");
    let m = model(ModelShape::Slab { depth: 3 }, &device);
    let good = dir.path().join("good.safetensors");
    checkpoint::save(&m, &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load(&path, &device).unwrap_err().to_string();
    assert!(e.contains("broken.safetensors"), "{e}");
}
