//! ONNX export of the segmentation model, written node by node.
//!
//! burn cannot export Conv3d, LayerNorm or attention, so the graph is built
//! here with infl8-onnx's prost structs (opset 17, symbolic batch) from the
//! burn module's own parameters, mirroring `SegModel::forward` op for op.
//! Only standard ops that tract, ONNX Runtime and TensorRT all run are used
//! (GELU as its erf form: `Gelu` needs opset 20). Every export is checked:
//! tract's output on random inputs must equal burn's, else the export fails
//! and nothing is written.

use std::path::Path;

use burn::module::Param;
use burn::nn::conv::{Conv3d, ConvTranspose3d};
use burn::nn::{InstanceNorm, LayerNorm, Linear, PaddingConfig3d};
use burn::tensor::{Device, Distribution, Tensor};
use infl8_core::manifest::Manifest;
use infl8_onnx::builder::{Attr, Dim, GraphBuilder};
use infl8_onnx::proto::ModelProto;

use crate::model::decoder::{ConvBlock, LEAKY_SLOPE};
use crate::model::encoder::Block;
use crate::model::{ModelShape, SegModel};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export: cannot read parameter {name}: {detail}")]
    Param { name: String, detail: String },
    #[error(
        "export verification failed: tract's output differs from burn's by {diff:.3e} \
         (limit {limit:.0e}) on random input; the ONNX graph does not match the model"
    )]
    Mismatch { diff: f32, limit: f32 },
    #[error("export verification: tract could not run the exported model: {0}")]
    Tract(String),
    #[error("{0}")]
    Onnx(#[from] infl8_onnx::OnnxError),
    #[error("{0}")]
    Manifest(#[from] infl8_core::manifest::ManifestError),
}

/// Largest difference allowed between tract and burn.
pub const VERIFY_LIMIT: f32 = 1e-4;

fn data<const D: usize>(name: &str, t: &Tensor<D>) -> Result<(Vec<i64>, Vec<f32>), ExportError> {
    let dims = t.dims().iter().map(|&d| d as i64).collect();
    let v = t
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| ExportError::Param {
            name: name.into(),
            detail: format!("{e:?}"),
        })?;
    Ok((dims, v))
}

struct Writer {
    g: GraphBuilder,
}

impl Writer {
    fn param<const D: usize>(
        &mut self,
        name: &str,
        p: &Param<Tensor<D>>,
    ) -> Result<String, ExportError> {
        self.tensor(name, &p.val())
    }

    fn tensor<const D: usize>(&mut self, name: &str, t: &Tensor<D>) -> Result<String, ExportError> {
        let (dims, v) = data(name, t)?;
        Ok(self.g.weight(name, &dims, &v))
    }

    fn ints(&mut self, name: &str, v: &[i64]) -> String {
        self.g.weight_i64(name, &[v.len() as i64], v)
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.g.weight(name, &[], &[v])
    }

    fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        self.g.node(op, inputs, vec![])
    }

    fn op_with(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.g.node(op, inputs, attrs)
    }

    fn linear(&mut self, name: &str, x: &str, l: &Linear) -> Result<String, ExportError> {
        let w = self.param(&format!("{name}.weight"), &l.weight)?;
        let y = self.op("MatMul", &[x, &w]);
        match &l.bias {
            Some(b) => {
                let b = self.param(&format!("{name}.bias"), b)?;
                Ok(self.op("Add", &[&y, &b]))
            }
            None => Ok(y),
        }
    }

    fn layer_norm(
        &mut self,
        name: &str,
        x: &str,
        ln: &LayerNorm,
        eps: f64,
    ) -> Result<String, ExportError> {
        let g = self.param(&format!("{name}.weight"), &ln.gamma)?;
        let mut inputs = vec![x.to_string(), g];
        if let Some(b) = &ln.beta {
            inputs.push(self.param(&format!("{name}.bias"), b)?);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.op_with(
            "LayerNormalization",
            &refs,
            vec![
                ("axis", Attr::Int(-1)),
                ("epsilon", Attr::Float(eps as f32)),
            ],
        ))
    }

    fn gelu(&mut self, x: &str) -> String {
        let inv_sqrt2 = self.scalar_once("const.inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2);
        let half = self.scalar_once("const.half", 0.5);
        let one = self.scalar_once("const.one", 1.0);
        let s = self.op("Mul", &[x, &inv_sqrt2]);
        let e = self.op("Erf", &[&s]);
        let e1 = self.op("Add", &[&e, &one]);
        let xh = self.op("Mul", &[x, &half]);
        self.op("Mul", &[&xh, &e1])
    }

    fn scalar_once(&mut self, name: &str, v: f32) -> String {
        if !self.has(name) {
            self.scalar(name, v);
        }
        name.to_string()
    }

    fn ints_once(&mut self, name: &str, v: &[i64]) -> String {
        if !self.has(name) {
            self.ints(name, v);
        }
        name.to_string()
    }

    fn has(&self, name: &str) -> bool {
        self.g.has_initializer(name)
    }

    fn conv(&mut self, name: &str, x: &str, c: &Conv3d) -> Result<String, ExportError> {
        let w = self.param(&format!("{name}.weight"), &c.weight)?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &c.bias {
            inputs.push(self.param(&format!("{name}.bias"), b)?);
        }
        let pads = match c.padding {
            PaddingConfig3d::Explicit(d, h, w) => [d, h, w],
            _ => [0, 0, 0],
        };
        let pads: Vec<i64> = pads.iter().chain(pads.iter()).map(|&p| p as i64).collect();
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.op_with(
            "Conv",
            &refs,
            vec![
                (
                    "kernel_shape",
                    Attr::Ints(c.kernel_size.iter().map(|&k| k as i64).collect()),
                ),
                (
                    "strides",
                    Attr::Ints(c.stride.iter().map(|&k| k as i64).collect()),
                ),
                ("pads", Attr::Ints(pads)),
            ],
        ))
    }

    fn deconv(&mut self, name: &str, x: &str, c: &ConvTranspose3d) -> Result<String, ExportError> {
        let w = self.param(&format!("{name}.weight"), &c.weight)?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &c.bias {
            inputs.push(self.param(&format!("{name}.bias"), b)?);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.op_with(
            "ConvTranspose",
            &refs,
            vec![
                (
                    "kernel_shape",
                    Attr::Ints(c.kernel_size.iter().map(|&k| k as i64).collect()),
                ),
                (
                    "strides",
                    Attr::Ints(c.stride.iter().map(|&k| k as i64).collect()),
                ),
            ],
        ))
    }

    fn instance_norm(
        &mut self,
        name: &str,
        x: &str,
        n: &InstanceNorm,
    ) -> Result<String, ExportError> {
        let ch = n.num_channels;
        let device = Device::default();
        let gamma = match &n.gamma {
            Some(g) => self.param(&format!("{name}.weight"), g)?,
            None => self.tensor(&format!("{name}.weight"), &Tensor::<1>::ones([ch], &device))?,
        };
        let beta = match &n.beta {
            Some(b) => self.param(&format!("{name}.bias"), b)?,
            None => self.tensor(&format!("{name}.bias"), &Tensor::<1>::zeros([ch], &device))?,
        };
        Ok(self.op_with(
            "InstanceNormalization",
            &[x, &gamma, &beta],
            vec![("epsilon", Attr::Float(n.epsilon as f32))],
        ))
    }

    fn conv_block(&mut self, name: &str, x: &str, b: &ConvBlock) -> Result<String, ExportError> {
        let mut y = x.to_string();
        for (i, (c, n)) in [(&b.conv1, &b.norm1), (&b.conv2, &b.norm2)]
            .into_iter()
            .enumerate()
        {
            let k = i + 1;
            y = self.conv(&format!("{name}.conv{k}"), &y, c)?;
            y = self.instance_norm(&format!("{name}.norm{k}"), &y, n)?;
            y = self.op_with(
                "LeakyRelu",
                &[&y],
                vec![("alpha", Attr::Float(LEAKY_SLOPE as f32))],
            );
        }
        Ok(y)
    }

    fn block(
        &mut self,
        name: &str,
        x: &str,
        b: &Block,
        width: usize,
        eps: f64,
    ) -> Result<String, ExportError> {
        let (c, h) = (width as i64, b.heads as i64);
        let hd = c / h;
        let n1 = self.layer_norm(&format!("{name}.norm1"), x, &b.norm1, eps)?;
        let qkv = self.linear(&format!("{name}.attn.qkv"), &n1, &b.qkv)?;
        let shape = self.ints_once(&format!("const.qkv_shape.{h}"), &[0, 0, 3, h, hd]);
        let qkv = self.op("Reshape", &[&qkv, &shape]);
        let qkv = self.op_with(
            "Transpose",
            &[&qkv],
            vec![("perm", Attr::Ints(vec![2, 0, 3, 1, 4]))],
        );
        let mut qkv_parts = Vec::new();
        for i in 0..3i64 {
            let idx = self.g.weight_i64(&format!("{name}.attn.idx{i}"), &[], &[i]);
            qkv_parts.push(self.op_with("Gather", &[&qkv, &idx], vec![("axis", Attr::Int(0))]));
        }
        let kt = self.op_with(
            "Transpose",
            &[&qkv_parts[1]],
            vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        );
        let s = self.op("MatMul", &[&qkv_parts[0], &kt]);
        let scale = self.scalar(&format!("{name}.attn.scale"), (hd as f32).powf(-0.5));
        let s = self.op("Mul", &[&s, &scale]);
        let a = self.op_with("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
        let o = self.op("MatMul", &[&a, &qkv_parts[2]]);
        let o = self.op_with(
            "Transpose",
            &[&o],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let shape = self.ints_once(&format!("const.tokens_shape.{c}"), &[0, 0, c]);
        let o = self.op("Reshape", &[&o, &shape]);
        let mut o = self.linear(&format!("{name}.attn.proj"), &o, &b.proj)?;
        if let Some(g) = &b.ls1 {
            let g = self.param(&format!("{name}.ls1"), g)?;
            o = self.op("Mul", &[&o, &g]);
        }
        let x = self.op("Add", &[x, &o]);
        let n2 = self.layer_norm(&format!("{name}.norm2"), &x, &b.norm2, eps)?;
        let m = self.linear(&format!("{name}.mlp.fc1"), &n2, &b.fc1)?;
        let m = self.gelu(&m);
        let mut m = self.linear(&format!("{name}.mlp.fc2"), &m, &b.fc2)?;
        if let Some(g) = &b.ls2 {
            let g = self.param(&format!("{name}.ls2"), g)?;
            m = self.op("Mul", &[&m, &g]);
        }
        Ok(self.op("Add", &[&x, &m]))
    }
}

/// The ONNX graph of `model`, with `manifest` in its metadata.
pub fn to_onnx(model: &SegModel, manifest: &Manifest) -> Result<ModelProto, ExportError> {
    let cfg = &model.config;
    let enc = &model.encoder;
    let eps = cfg.vit.eps;
    let c = cfg.vit.width as i64;
    let [td, gh, gw] = enc.grid.map(|v| v as i64);
    let t = td * gh * gw;
    let n_cls = i64::from(enc.cls.is_some());
    let mut w = Writer {
        g: GraphBuilder::new(&format!("infl8_{}", cfg.init.name())),
    };
    let fixed = |v: &[usize]| v.iter().map(|&d| Dim::Fixed(d as i64)).collect::<Vec<_>>();
    let mut in_dims = vec![Dim::Symbolic("N")];
    in_dims.extend(fixed(&cfg.input_item_shape()));
    let image = w.g.input("image", &in_dims);

    // Internal layout [N, C, D, H, W].
    let x = match cfg.shape {
        ModelShape::Slab { .. } => image.clone(),
        ModelShape::Volumetric { .. } => w.op_with(
            "Transpose",
            &[&image],
            vec![("perm", Attr::Ints(vec![0, 1, 4, 2, 3]))],
        ),
    };

    // Patch embedding and tokens.
    let p = w.conv("encoder.patch", &x, &enc.patch)?;
    let shape = w.ints("const.patch_tokens", &[0, c, t]);
    let tok = w.op("Reshape", &[&p, &shape]);
    let mut h = w.op_with(
        "Transpose",
        &[&tok],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    if let Some(cls) = &enc.cls {
        let cls = w.param("encoder.cls_token", cls)?;
        // Broadcast cls to the batch: shape [N, 1, C] from the tokens' shape.
        let sh = w.op("Shape", &[&h]);
        let (s0, e1, ax) = (
            w.ints("const.zero", &[0]),
            w.ints("const.one_i", &[1]),
            w.ints("const.axis0", &[0]),
        );
        let nb = w.op("Slice", &[&sh, &s0, &e1, &ax]);
        let rest = w.ints("const.cls_rest", &[1, c]);
        let target = w.op_with("Concat", &[&nb, &rest], vec![("axis", Attr::Int(0))]);
        let cls_b = w.op("Expand", &[&cls, &target]);
        h = w.op_with("Concat", &[&cls_b, &h], vec![("axis", Attr::Int(1))]);
    }
    let pos = w.param("encoder.pos_embed", &enc.pos)?;
    h = w.op("Add", &[&h, &pos]);

    let last = *cfg.taps.last().unwrap_or(&enc.blocks.len());
    let mut taps = Vec::new();
    for (i, b) in enc.blocks.iter().take(last).enumerate() {
        h = w.block(&format!("encoder.blocks.{i}"), &h, b, cfg.vit.width, eps)?;
        if cfg.taps.contains(&(i + 1)) {
            let z = if i + 1 == last {
                w.layer_norm("encoder.norm", &h, &enc.norm, eps)?
            } else {
                h.clone()
            };
            let (st, en, ax) = (
                w.ints(&format!("tap{i}.start"), &[n_cls]),
                w.ints(&format!("tap{i}.end"), &[n_cls + t]),
                w.ints(&format!("tap{i}.axis"), &[1]),
            );
            let z = w.op("Slice", &[&z, &st, &en, &ax]);
            let z = w.op_with(
                "Transpose",
                &[&z],
                vec![("perm", Attr::Ints(vec![0, 2, 1]))],
            );
            let shape = w.ints(&format!("tap{i}.shape"), &[0, c, td, gh, gw]);
            taps.push(w.op("Reshape", &[&z, &shape]));
        }
    }

    // Decoder.
    let dec = &model.decoder;
    let skip_in = match cfg.shape {
        ModelShape::Slab { depth } => {
            let [h_, w_] = cfg.roi_hw();
            let shape = w.ints(
                "const.slab_skip",
                &[
                    0,
                    (cfg.in_channels() * depth) as i64,
                    1,
                    h_ as i64,
                    w_ as i64,
                ],
            );
            w.op("Reshape", &[&x, &shape])
        }
        ModelShape::Volumetric { .. } => x.clone(),
    };
    let l = dec.levels.len();
    let mut y = taps.pop().unwrap_or_default();
    for (j0, level) in dec.levels.iter().enumerate() {
        let j = j0 + 1;
        let skip = if j < l {
            let mut s = taps[l - 1 - j].clone();
            for (k, step) in dec.skips[j - 1].iter().enumerate() {
                s = w.deconv(&format!("decoder.skips.{j0}.{k}.up"), &s, &step.up)?;
                s = w.conv_block(&format!("decoder.skips.{j0}.{k}.block"), &s, &step.block)?;
            }
            s
        } else {
            w.conv_block("decoder.input_block", &skip_in, &dec.input_block)?
        };
        let up = w.deconv(&format!("decoder.levels.{j0}.up"), &y, &level.up)?;
        let cat = w.op_with("Concat", &[&up, &skip], vec![("axis", Attr::Int(1))]);
        y = w.conv_block(&format!("decoder.levels.{j0}.block"), &cat, &level.block)?;
    }
    let logits = w.conv("decoder.head", &y, &dec.head)?;
    let out = match cfg.shape {
        ModelShape::Slab { .. } => logits,
        ModelShape::Volumetric { .. } => w.op_with(
            "Transpose",
            &[&logits],
            vec![("perm", Attr::Ints(vec![0, 1, 3, 4, 2]))],
        ),
    };
    w.g.rename_last_output("logits");
    let _ = out;
    let mut out_dims = vec![Dim::Symbolic("N")];
    out_dims.extend(fixed(&cfg.output_item_shape()));
    w.g.output("logits", &out_dims);
    let mut m = w.g.finish("infl8-trainer");
    infl8_onnx::set_metadata(&mut m, infl8_onnx::MANIFEST_KEY, &manifest.to_json());
    infl8_onnx::set_metadata(
        &mut m,
        "infl8.model_config",
        &serde_json::to_string(cfg).unwrap_or_default(),
    );
    Ok(m)
}

/// Runs the exported graph in tract and the burn model on the same random
/// input (batch 2); returns the largest absolute difference.
pub fn verify(model: &SegModel, onnx: &ModelProto, seed: u64) -> Result<f32, ExportError> {
    use tract_onnx::prelude::{
        Datum, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TractError,
        tvec,
    };
    let device = model.encoder.pos.val().device();
    let mut shape = vec![2];
    shape.extend(model.config.input_item_shape());
    let s5: [usize; 5] = shape
        .clone()
        .try_into()
        .map_err(|_| ExportError::Tract("model input must have rank 5".into()))?;
    device.seed(seed);
    let x = Tensor::<5>::random(s5, Distribution::Normal(0.0, 1.0), &device);
    let expect = data("burn output", &model.forward(x.clone()))?;
    let input = data("input", &x)?;

    let bytes = infl8_onnx::encode(onnx);
    let tract_err = |e: TractError| ExportError::Tract(format!("{e:#}"));
    let plan = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(bytes))
        .and_then(|m| {
            m.with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape.clone()))
        })
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(tract_err)?;
    let t = tract_onnx::prelude::Tensor::from_shape(&shape, &input.1).map_err(tract_err)?;
    let out = plan.run(tvec![t.into_tvalue()]).map_err(tract_err)?;
    let out = out
        .first()
        .ok_or_else(|| ExportError::Tract("no output".into()))?
        .cast_to::<f32>()
        .map_err(tract_err)?;
    let got_shape: Vec<i64> = out.shape().iter().map(|&d| d as i64).collect();
    if got_shape != expect.0 {
        return Err(ExportError::Tract(format!(
            "tract output shape {got_shape:?}, burn {:?}",
            expect.0
        )));
    }
    let view = out.try_as_plain_ram().map_err(tract_err)?;
    let got = view.as_slice::<f32>().map_err(tract_err)?;
    Ok(got
        .iter()
        .zip(expect.1.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max))
}

/// Builds, verifies and writes the ONNX file. Nothing is written when the
/// check fails.
pub fn export(model: &SegModel, manifest: &Manifest, path: &Path) -> Result<f32, ExportError> {
    // The runtime refuses a model whose manifest does not fit its I/O: such
    // a file must never be written.
    let cfg = &model.config;
    infl8_core::manifest::check_model_fits(
        manifest,
        path,
        &crate::train::runtime_model::info("image", cfg.input_item_shape()),
        &crate::train::runtime_model::info("logits", cfg.output_item_shape()),
    )?;
    let onnx = to_onnx(model, manifest)?;
    let diff = verify(model, &onnx, 17)?;
    // NaN fails too.
    if diff.is_nan() || diff > VERIFY_LIMIT {
        return Err(ExportError::Mismatch {
            diff,
            limit: VERIFY_LIMIT,
        });
    }
    infl8_onnx::write_model(&onnx, path)?;
    Ok(diff)
}

/// How the runtime should feed the model (goes into the manifest).
#[derive(Clone, Debug)]
pub struct RuntimeSpec {
    pub name: Option<String>,
    pub labels: Vec<String>,
    pub preprocess: infl8_core::preprocess::PreprocessSpec,
    /// Overlap of neighbouring windows.
    pub overlap: f64,
    /// Label clean-up the runtime applies (and validation measures).
    pub postprocess: infl8_core::manifest::Postprocessing,
}

/// The manifest `infl8 segment` reads: mode and window from the model,
/// preprocessing and labels from `spec`.
pub fn manifest_for(model: &SegModel, spec: &RuntimeSpec) -> Result<Manifest, String> {
    use infl8_core::manifest::{InferenceMode, MANIFEST_FORMAT};
    let cfg = &model.config;
    if spec.labels.len() != cfg.classes {
        return Err(format!(
            "{} label names given for a model with {} classes",
            spec.labels.len(),
            cfg.classes
        ));
    }
    let [h, w] = cfg.roi_hw();
    let inference = match cfg.shape {
        ModelShape::Slab { depth } => InferenceMode::Slab(infl8_core::inference::Slab {
            depth,
            roi_xy: Some([h, w]),
            overlap: spec.overlap,
            ..Default::default()
        }),
        ModelShape::Volumetric { tile_depth, .. } => {
            InferenceMode::SlidingWindow(infl8_core::inference::SlidingWindow {
                roi: [h, w, tile_depth],
                overlap: spec.overlap,
                ..Default::default()
            })
        }
    };
    Ok(Manifest {
        format: MANIFEST_FORMAT,
        name: spec.name.clone(),
        input_channels: cfg.in_channels(),
        labels: spec.labels.clone(),
        inference,
        preprocess: spec.preprocess.clone(),
        postprocess: spec.postprocess,
    })
}
