//! PyTorch checkpoint import, from a fixture written by real `torch.save`
//! (tests/fixtures/make_vit_tiny_pt.py): values follow a formula, so the
//! expected ViT is rebuilt here without torch.

mod import_common;

use import_common::*;
use infl8_trainer::import::{ImportError, ImportOptions, Naming, SourceFormat, load_vit2d_with};

/// The shapes make_vit_tiny_pt.py writes, in timm names.
fn backbone_shapes() -> Vec<(String, Vec<usize>)> {
    let (c, m, p, grid, depth) = (16, 32, 2, 2, 2);
    let mut s: Vec<(String, Vec<usize>)> = vec![
        ("patch_embed.proj.weight".into(), vec![c, 3, p, p]),
        ("patch_embed.proj.bias".into(), vec![c]),
        ("cls_token".into(), vec![1, 1, c]),
        ("pos_embed".into(), vec![1, 1 + grid * grid, c]),
    ];
    for i in 0..depth {
        let b = |n: &str| format!("blocks.{i}.{n}");
        s.extend([
            (b("norm1.weight"), vec![c]),
            (b("norm1.bias"), vec![c]),
            (b("attn.qkv.weight"), vec![3 * c, c]),
            (b("attn.qkv.bias"), vec![3 * c]),
            (b("attn.proj.weight"), vec![c, c]),
            (b("attn.proj.bias"), vec![c]),
            (b("ls1.gamma"), vec![c]),
            (b("norm2.weight"), vec![c]),
            (b("norm2.bias"), vec![c]),
            (b("mlp.fc1.weight"), vec![m, c]),
            (b("mlp.fc1.bias"), vec![m]),
            (b("mlp.fc2.weight"), vec![c, m]),
            (b("mlp.fc2.bias"), vec![c]),
            (b("ls2.gamma"), vec![c]),
        ]);
    }
    s.push(("norm.weight".into(), vec![c]));
    s.push(("norm.bias".into(), vec![c]));
    s
}

/// The fixture script's formula.
fn values(name: &str, shape: &[usize]) -> Vec<f32> {
    let k = name.bytes().map(u64::from).sum::<u64>() % 1000;
    let n: u64 = shape.iter().product::<usize>() as u64;
    (0..n)
        .map(|i| ((((i * 7919 + k * 104729) % 2003) as f64 - 1001.0) / 1000.0) as f32)
        .collect()
}

fn heads2() -> ImportOptions {
    ImportOptions {
        heads: Some(2),
        ..Default::default()
    }
}

#[test]
fn torch_save_checkpoint_imports_exactly() {
    let (got, report) = load_vit2d_with(fixture("vit_tiny_timm.pt"), &heads2()).unwrap();
    assert_eq!(report.format, SourceFormat::Pytorch);
    assert_eq!(report.naming, Naming::Timm);
    // The "model" key of the checkpoint, then DataParallel's prefix.
    assert_eq!(report.prefix, "model.module.");
    assert_eq!(
        report.ignored,
        ["model.module.head.bias", "model.module.head.weight"]
    );
    assert!(report.missing.is_empty(), "{report}");

    // The same values through the SafeTensors path.
    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().join("expected.safetensors");
    let tensors: Named = backbone_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let v = values(&name, &shape);
            (name, shape, v)
        })
        .collect();
    write_safetensors(&expected, &tensors);
    let (want, _) = load_vit2d_with(&expected, &heads2()).unwrap();
    assert_vit_eq(&got, &want);
    let c = &got.config;
    assert_eq!(
        (c.width, c.depth, c.mlp, c.patch, c.grid),
        (16, 2, 32, 2, [2, 2])
    );
    assert!(c.cls_token && c.layer_scale);
}

#[test]
fn broken_checkpoints_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("vit_tiny_timm.pt")).unwrap();
    let path = dir.path().join("cut.pth");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_vit2d_with(&path, &heads2()).unwrap_err();
    assert!(matches!(err, ImportError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("cut.pth"), "{err}");

    let path = dir.path().join("text.bin");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let err = load_vit2d_with(&path, &heads2()).unwrap_err();
    assert!(err.to_string().contains("text.bin"), "{err}");

    let err = load_vit2d_with(dir.path().join("absent.pt"), &heads2()).unwrap_err();
    assert!(matches!(err, ImportError::Io { .. }), "{err:?}");
}
