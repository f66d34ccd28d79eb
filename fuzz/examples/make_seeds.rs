//! Writes the seed corpora of the fuzz targets from the project's real
//! inputs (see docs/fuzzing.md): tiny NIfTI files downsampled from the MNI152
//! and Colin27 volumes with infl8's own writer, the README's example
//! manifest, the shipped model's manifest, a small ONNX model carrying one,
//! and the firmware profiles. Run from `fuzz/` after
//! `./scripts/fetch-data.sh && ./scripts/fetch-train-data.sh`:
//!
//! ```sh
//! cargo +nightly run --example make_seeds
//! ```
//! then `cargo +nightly fuzz cmin TARGET` each target.

use std::fs;
use std::path::{Path, PathBuf};

use infl8_core::Volume;
use infl8_core::nifti_io::{self, DataType, ReadLimits};
use ndarray::{Axis, s};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `step`-th voxel, the affine scaled to match, at most `max` per axis.
fn downsample(vol: &Volume, step: usize, max: usize) -> Volume {
    let data = vol
        .data
        .slice(s![.., ..;step, ..;step, ..;step])
        .slice(s![.., ..max, ..max, ..max])
        .to_owned();
    let mut affine = vol.affine;
    for r in 0..3 {
        for c in 0..3 {
            affine[(r, c)] *= step as f64;
        }
    }
    Volume::new(data, affine)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = root().join("fuzz/corpus");
    let nii = corpus.join("nifti_read");
    fs::create_dir_all(&nii)?;
    let limits = ReadLimits::default();
    let read = |p: &str| nifti_io::read_volume(&root().join(p), &limits);

    let t1 = read(".cache/data/mni152/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz")?;
    let small = downsample(&t1, 12, 8);
    nifti_io::write_volume(&nii.join("mni152-t1-i16.nii"), &small, DataType::I16)?;
    nifti_io::write_volume(&nii.join("mni152-t1-f32.nii.gz"), &small, DataType::F32)?;

    let mask = read(".cache/data/mni152/tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")?;
    let mask = downsample(&mask, 12, 8);
    let labels = mask.data.index_axis(Axis(0), 0).mapv(|v| v as u8);
    nifti_io::write_labels(&nii.join("mni152-mask-u8.nii.gz"), labels.view(), &mask)?;

    // Two channels (a 4D file) of a real oblique-free scan, as f64.
    let colin = read(".cache/train-data/brain/colin27_image.nii.gz")?;
    let c = downsample(&colin, 30, 6);
    let two = ndarray::concatenate(Axis(0), &[c.data.view(), c.data.view()])?;
    let two = Volume::new(two, c.affine);
    nifti_io::write_volume(&nii.join("colin27-2ch-f64.nii"), &two, DataType::F64)?;

    let man = corpus.join("manifest_parse");
    fs::create_dir_all(&man)?;
    let readme = fs::read_to_string(root().join("README.md"))?;
    let example = readme
        .split("```json\n")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .ok_or("no JSON manifest in README.md")?;
    fs::write(man.join("readme-example.json"), example)?;
    let shipped = infl8_onnx::read_model(&root().join("models/brain-mask.onnx"))?;
    let shipped_json =
        infl8_onnx::metadata(&shipped, infl8_onnx::MANIFEST_KEY).ok_or("no manifest")?;
    fs::write(man.join("brain-mask.json"), shipped_json)?;
    // The shipped model without its weights: real I/O, real metadata, small.
    let mut light = shipped.clone();
    if let Some(g) = light.graph.as_mut() {
        g.initializer.clear();
        g.node.clear();
        g.value_info.clear();
    }
    fs::write(man.join("brain-mask-io.onnx"), infl8_onnx::encode(&light))?;
    let mut head = infl8_onnx::examples::head_mask_model([8, 8, 8], 0.12, 20.0);
    infl8_onnx::set_metadata(&mut head, infl8_onnx::MANIFEST_KEY, example);
    fs::write(man.join("head-mask.onnx"), infl8_onnx::encode(&head))?;

    let cfg = corpus.join("config_parse");
    fs::create_dir_all(&cfg)?;
    for e in fs::read_dir(root().join("firmware-configs"))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "toml") {
            fs::copy(&p, cfg.join(p.file_name().ok_or("no name")?))?;
        }
    }
    fs::create_dir_all(corpus.join("tensor_check"))?;
    println!("seeds written under {}", corpus.display());
    Ok(())
}
