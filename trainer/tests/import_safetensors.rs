//! SafeTensors import: timm and HF layouts of the same tiny ViT give the same
//! `Vit2d`; the canonical file round-trips exactly; bad files fail naming the
//! file and the tensor.

mod import_common;

use std::collections::HashMap;

use burn::tensor::{Device, Tensor, TensorData};

use import_common::*;
use infl8_trainer::import::{
    ImportError, ImportOptions, Naming, SourceFormat, VIT2D_METADATA_KEY, load_vit2d,
    load_vit2d_with, save_vit2d,
};
use infl8_trainer::inflate::Vit3dWeights;
use infl8_trainer::model::Encoder;
use infl8_trainer::reference;

fn heads2() -> ImportOptions {
    ImportOptions {
        heads: Some(2),
        ..Default::default()
    }
}

#[test]
fn timm_and_hf_layouts_import_to_the_same_vit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let vit = random_vit(&cfg, 1);

    let timm = dir.path().join("timm.safetensors");
    write_safetensors(&timm, &timm_tensors(&vit, ""));
    let (a, report) = load_vit2d_with(&timm, &heads2()).unwrap();
    assert_vit_eq(&a, &vit);
    assert_eq!(report.format, SourceFormat::Safetensors);
    assert_eq!(report.naming, Naming::Timm);
    assert_eq!(report.prefix, "");
    assert!(report.ignored.is_empty(), "{report}");
    assert!(report.missing.is_empty(), "{report}");
    assert_eq!(report.loaded.len(), timm_tensors(&vit, "").len());

    // HF Dinov2Model inside a classifier: prefix, mask token and head.
    let hf = dir.path().join("hf.safetensors");
    let mut tensors = hf_tensors(&vit, "dinov2.", true);
    tensors.push((
        "dinov2.embeddings.mask_token".into(),
        vec![1, 32],
        vec![0.0; 32],
    ));
    tensors.push(("classifier.weight".into(), vec![10, 64], vec![0.5; 640]));
    tensors.push(("classifier.bias".into(), vec![10], vec![0.5; 10]));
    write_safetensors(&hf, &tensors);
    let (b, report) = load_vit2d_with(&hf, &heads2()).unwrap();
    assert_vit_eq(&b, &vit);
    assert_eq!(report.naming, Naming::Hf);
    assert_eq!(report.prefix, "dinov2.");
    assert_eq!(
        report.ignored,
        [
            "classifier.bias",
            "classifier.weight",
            "dinov2.embeddings.mask_token"
        ]
    );

    // Two independent implementations of the forward pass, one per import:
    // the reference on the timm import, the trainer's burn encoder on the
    // HF import. They agree only if both imports are the same working ViT.
    let image = smooth_image(12, 12);
    let want = reference::forward_tokens(&a, image.view()).unwrap();
    assert_eq!(want.shape(), [10, 32]);
    assert!(want.iter().all(|v| v.is_finite()));
    let device = Device::default();
    let enc = Encoder::from_weights(&Vit3dWeights::exact_2d(&b), &device);
    let x = Tensor::<5>::from_data(
        TensorData::new(
            image.iter().copied().collect::<Vec<f32>>(),
            [1, 3, 1, 12, 12],
        ),
        &device,
    );
    let got = enc
        .tokens(x)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want.iter())
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff <= 1e-4,
        "burn (HF import) vs reference (timm import): {diff}"
    );
}

#[test]
fn hf_vit_model_names_default_to_its_eps() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.layer_scale = false;
    cfg.eps = 1e-12;
    let vit = random_vit(&cfg, 2);
    let path = dir.path().join("model.safetensors");
    let mut tensors = hf_tensors(&vit, "vit.", false);
    tensors.push((
        "vit.pooler.dense.weight".into(),
        vec![32, 32],
        vec![0.0; 1024],
    ));
    write_safetensors(&path, &tensors);
    let (got, report) = load_vit2d_with(&path, &heads2()).unwrap();
    assert_vit_eq(&got, &vit);
    assert_eq!(report.ignored, ["vit.pooler.dense.weight"]);
    assert!(!got.config.layer_scale);
}

#[test]
fn hf_config_json_gives_heads_and_eps() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.heads = 4;
    cfg.eps = 1e-5;
    let vit = random_vit(&cfg, 3);
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &hf_tensors(&vit, "", true));
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "dinov2", "hidden_size": 32, "num_attention_heads": 4, "layer_norm_eps": 1e-05}"#,
    )
    .unwrap();
    let (got, report) = load_vit2d(&path).unwrap();
    assert_vit_eq(&got, &vit);
    assert!(report.to_string().contains("config.json"), "{report}");
}

#[test]
fn canonical_file_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.heads = 4;
    cfg.eps = 1e-5;
    // Non-square grid: only the metadata can tell it.
    cfg.grid = [2, 3];
    let vit = random_vit(&cfg, 4);
    let path = dir.path().join("vit2d.safetensors");
    save_vit2d(&path, &vit).unwrap();
    // No options: heads, eps and grid all come from the metadata.
    let (back, report) = load_vit2d(&path).unwrap();
    assert_vit_eq(&back, &vit);
    assert_eq!(report.naming, Naming::Timm);
    assert!(
        report.ignored.is_empty() && report.missing.is_empty(),
        "{report}"
    );

    // Saving what was loaded gives the same bytes.
    let again = dir.path().join("again.safetensors");
    save_vit2d(&again, &back).unwrap();
    assert!(std::fs::read(&path).unwrap() == std::fs::read(&again).unwrap());

    // And without cls token or layer scale.
    let mut cfg = tiny_config();
    cfg.cls_token = false;
    cfg.layer_scale = false;
    let vit = random_vit(&cfg, 5);
    save_vit2d(&path, &vit).unwrap();
    let (back, _) = load_vit2d(&path).unwrap();
    assert_vit_eq(&back, &vit);
}

#[test]
fn metadata_that_contradicts_the_weights_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let vit = random_vit(&tiny_config(), 6);
    let path = dir.path().join("bad-meta.safetensors");
    let mut meta = tiny_config();
    meta.depth = 3;
    let metadata = HashMap::from([(
        VIT2D_METADATA_KEY.to_owned(),
        serde_json::to_string(&meta).unwrap(),
    )]);
    write_safetensors_with(&path, &timm_tensors(&vit, ""), Some(metadata), &[]);
    let err = load_vit2d(&path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad-meta.safetensors") && msg.contains("metadata"),
        "{msg}"
    );
}

#[test]
fn timm_variants_split_bias_no_embed_class_chunks_and_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let mut vit = random_vit(&cfg, 7);
    let c = cfg.width;
    // BEiT-style q/v biases: k bias is zero by construction.
    for b in &mut vit.blocks {
        b.qkv_b.slice_mut(ndarray::s![c..2 * c]).fill(0.0);
    }
    // No pos entry for cls (no_embed_class): the import adds a zero row.
    vit.pos.row_mut(0).fill(0.0);
    // Exactly representable in bf16.
    vit.norm_b.mapv_inplace(|v| (v * 8.0).round() / 8.0);

    let mut tensors = Named::new();
    for (name, shape, values) in timm_tensors(&vit, "module.") {
        // DINOv2 block chunks: blocks.<chunk>.<index>.
        let name = match name.strip_prefix("module.blocks.") {
            Some(rest) => format!("module.blocks.0.{rest}"),
            None => name,
        };
        if let Some(rest) = name.strip_suffix("attn.qkv.bias") {
            tensors.push((format!("{rest}attn.q_bias"), vec![c], values[..c].to_vec()));
            tensors.push((
                format!("{rest}attn.v_bias"),
                vec![c],
                values[2 * c..].to_vec(),
            ));
        } else if name == "module.pos_embed" {
            tensors.push((name, vec![1, 9, c], values[c..].to_vec()));
        } else {
            tensors.push((name, shape, values));
        }
    }
    let path = dir.path().join("variants.safetensors");
    write_safetensors_with(&path, &tensors, None, &["module.norm.bias"]);
    let (got, report) = load_vit2d_with(&path, &heads2()).unwrap();
    assert_vit_eq(&got, &vit);
    assert_eq!(report.prefix, "module.");
    assert!(report.to_string().contains("no_embed_class"), "{report}");
}

#[test]
fn absent_biases_are_zeros_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut vit = random_vit(&tiny_config(), 8);
    for b in &mut vit.blocks {
        b.qkv_b.fill(0.0);
    }
    let tensors: Named = timm_tensors(&vit, "")
        .into_iter()
        .filter(|(n, _, _)| !n.ends_with("attn.qkv.bias"))
        .collect();
    let path = dir.path().join("nobias.safetensors");
    write_safetensors(&path, &tensors);
    let (got, report) = load_vit2d_with(&path, &heads2()).unwrap();
    assert_vit_eq(&got, &vit);
    assert_eq!(
        report.missing,
        ["blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias"]
    );
}

#[test]
fn missing_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let vit = random_vit(&tiny_config(), 9);
    let tensors: Named = timm_tensors(&vit, "")
        .into_iter()
        .filter(|(n, _, _)| n != "blocks.1.mlp.fc2.weight" && n != "norm.bias")
        .collect();
    let path = dir.path().join("missing.safetensors");
    write_safetensors(&path, &tensors);
    let err = load_vit2d_with(&path, &heads2()).unwrap_err();
    assert!(matches!(err, ImportError::Missing { .. }), "{err:?}");
    let msg = err.to_string();
    for want in [
        "missing.safetensors",
        "blocks.1.mlp.fc2.weight",
        "norm.bias",
    ] {
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn wrong_shapes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let vit = random_vit(&tiny_config(), 10);
    let mut tensors = timm_tensors(&vit, "");
    for (name, shape, values) in &mut tensors {
        if name == "blocks.0.attn.proj.weight" {
            *shape = vec![16, 64];
            values.truncate(16 * 64);
        }
    }
    let path = dir.path().join("shape.safetensors");
    write_safetensors(&path, &tensors);
    let err = load_vit2d_with(&path, &heads2()).unwrap_err();
    assert!(matches!(err, ImportError::Shape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("shape.safetensors") && msg.contains("blocks.0.attn.proj.weight"),
        "{msg}"
    );
}

#[test]
fn unsupported_block_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vit = random_vit(&tiny_config(), 11);
    let mut tensors = timm_tensors(&vit, "");
    tensors.push((
        "blocks.0.attn.q_norm.weight".into(),
        vec![16],
        vec![1.0; 16],
    ));
    let path = dir.path().join("qknorm.safetensors");
    write_safetensors(&path, &tensors);
    let err = load_vit2d_with(&path, &heads2()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImportError::Unsupported { .. }), "{err:?}");
    assert!(msg.contains("blocks.0.attn.q_norm.weight"), "{msg}");
}

#[test]
fn heads_need_a_source_below_width_64() {
    let dir = tempfile::tempdir().unwrap();
    let vit = random_vit(&tiny_config(), 12);
    let path = dir.path().join("noheads.safetensors");
    write_safetensors(&path, &timm_tensors(&vit, ""));
    let err = load_vit2d(&path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("noheads.safetensors") && msg.contains("heads"),
        "{msg}"
    );
    // Heads that do not divide the width.
    let err = load_vit2d_with(
        &path,
        &ImportOptions {
            heads: Some(5),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("5 heads"), "{err}");
}

#[test]
fn non_square_position_table_needs_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.grid = [2, 3];
    let vit = random_vit(&cfg, 13);
    let path = dir.path().join("nonsquare.safetensors");
    write_safetensors(&path, &timm_tensors(&vit, ""));
    let err = load_vit2d_with(&path, &heads2()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("nonsquare.safetensors") && msg.contains("pos_embed"),
        "{msg}"
    );
}

#[test]
fn truncated_and_foreign_files_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let vit = random_vit(&tiny_config(), 14);
    let path = dir.path().join("cut.safetensors");
    save_vit2d(&path, &vit).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_vit2d(&path).unwrap_err();
    assert!(matches!(err, ImportError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");

    let err = load_vit2d(dir.path().join("absent.safetensors")).unwrap_err();
    assert!(matches!(err, ImportError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.safetensors"), "{err}");

    let err = load_vit2d(dir.path().join("weights.h5")).unwrap_err();
    assert!(matches!(err, ImportError::UnknownFormat { .. }), "{err:?}");

    // A SafeTensors file of something else entirely.
    let path = dir.path().join("resnet.safetensors");
    write_safetensors(
        &path,
        &vec![("conv1.weight".into(), vec![4, 3, 3, 3], vec![0.0; 108])],
    );
    let err = load_vit2d(&path).unwrap_err();
    assert!(matches!(err, ImportError::NotAVit { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("resnet.safetensors") && msg.contains("conv1.weight"),
        "{msg}"
    );
}

#[test]
fn several_backbones_need_a_choice() {
    let dir = tempfile::tempdir().unwrap();
    let a = random_vit(&tiny_config(), 15);
    let b = random_vit(&tiny_config(), 16);
    let mut tensors = timm_tensors(&a, "student.backbone.");
    tensors.extend(timm_tensors(&b, "teacher.backbone."));
    let path = dir.path().join("dino.safetensors");
    write_safetensors(&path, &tensors);
    let err = load_vit2d_with(&path, &heads2()).unwrap_err();
    assert!(err.to_string().contains("teacher.backbone."), "{err}");
    let (got, report) = load_vit2d_with(
        &path,
        &ImportOptions {
            heads: Some(2),
            prefix: Some("teacher.backbone".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_vit_eq(&got, &b);
    assert_eq!(report.ignored.len(), tensors.len() / 2);
}

#[test]
fn reference_checks_the_token_grid() {
    let vit = random_vit(&tiny_config(), 17);
    let err = reference::forward_tokens(&vit, smooth_image(16, 16).view()).unwrap_err();
    assert!(err.to_string().contains("4x4"), "{err}");
    let resized = reference::resize_pos_embed(&vit, [4, 4]).unwrap();
    let tokens = reference::forward_tokens(&resized, smooth_image(16, 16).view()).unwrap();
    assert_eq!(tokens.shape(), [17, 32]);
    let err = reference::forward_tokens(&vit, smooth_image(13, 12).view()).unwrap_err();
    assert!(err.to_string().contains("13x12"), "{err}");

    let states = reference::forward_hidden_states(&vit, smooth_image(12, 12).view()).unwrap();
    assert_eq!(states.blocks.len(), 2);
    assert_eq!(
        states.tokens,
        reference::forward_tokens(&vit, smooth_image(12, 12).view()).unwrap()
    );
}
