//! End to end: `infl8 segment --preview` draws the segmentation of a real
//! MRI over the scan as a PNG.

use std::path::Path;
use std::process::Output;

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{example_model, ok, s, t1_2mm};

fn segment(model: &Path, input: &Path, output: &Path, preview: &Path) -> Output {
    infl8_suite::segment(
        model,
        input,
        output,
        &["--preview", s(preview), "--threads", "2"],
    )
}

/// (width, height, RGB pixels) of a PNG file.
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(3)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, pixels)
}

#[test]
fn preview_shows_the_head_mask_in_red_over_the_mri() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let out = dir.path().join("mask.nii.gz");
    // The preview's folder does not exist yet: segment creates it.
    let preview = dir.path().join("previews").join("head.png");
    ok(&segment(&model, &t1_2mm(), &out, &preview));
    assert!(out.is_file());

    let (w, h, pixels) = decode(&preview);
    // 91 x 109 x 91 voxels of 2 mm: the largest extent (218 mm, A-P) is
    // drawn 256 px tall, the 182 mm L-R and I-S extents 214 px. Row 1:
    // axial 214x256, coronal 214x214, sagittal 256x214; row 2: three axials;
    // 4 px margins and gaps.
    assert_eq!((w, h), (214 + 214 + 256 + 4 * 4, 256 + 256 + 3 * 4));
    assert_eq!(pixels[0], [24, 24, 24], "dark background");

    // Label 1 is red at 40 %: every filled pixel is grey + (102, 0, 0).
    let filled = pixels
        .iter()
        .filter(|p| p[1] == p[2] && i32::from(p[0]) - i32::from(p[1]) == 102)
        .count();
    let outline = pixels.iter().filter(|&&p| p == [255, 0, 0]).count();
    let grey = pixels
        .iter()
        .filter(|p| p[0] == p[1] && p[1] == p[2] && **p != [24, 24, 24])
        .count();
    let total = pixels.len();
    // The head covers roughly half of each panel, the air around it stays grey.
    assert!(filled > total / 4, "{filled} of {total} pixels red");
    assert!(outline > 1000, "{outline} outline pixels");
    assert!(grey > total / 10, "{grey} of {total} pixels grey");
}

#[test]
fn flipped_storage_gives_the_same_preview() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let limits = ReadLimits::default();
    let input = t1_2mm();
    let v = nifti_io::read_volume(&input, &limits).unwrap();

    // The scan stored LPS: the first two axes reversed, the affine
    // compensating, so every voxel keeps its world position.
    let mut lps = v.clone();
    for a in 0..2 {
        lps.data.invert_axis(ndarray::Axis(a + 1));
        let last = (v.dims()[a] - 1) as f64;
        for r in 0..3 {
            lps.affine[(r, 3)] += v.affine[(r, a)] * last;
            lps.affine[(r, a)] = -v.affine[(r, a)];
        }
    }
    lps.header = None;
    let lps_path = dir.path().join("lps.nii.gz");
    nifti_io::write_volume(&lps_path, &lps, nifti_io::OutputType::F32).unwrap();

    let (pa, pb) = (dir.path().join("a.png"), dir.path().join("b.png"));
    ok(&segment(&model, &input, &dir.path().join("a.nii.gz"), &pa));
    ok(&segment(
        &model,
        &lps_path,
        &dir.path().join("b.nii.gz"),
        &pb,
    ));
    assert!(
        std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(),
        "RAS and LPS storage of the same scan give different previews"
    );
}

#[test]
fn folder_mode_writes_one_preview_per_input_and_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let inbox = dir.path().join("in");
    let outbox = dir.path().join("out");
    let previews = dir.path().join("previews");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::copy(t1_2mm(), inbox.join("a.nii.gz")).unwrap();
    // Gzip is detected from the content, not the name: b.nii is named the
    // other way the preview name is derived from.
    std::fs::copy(t1_2mm(), inbox.join("b.nii")).unwrap();
    ok(&segment(&model, &inbox, &outbox, &previews));
    for name in ["a.png", "b.png"] {
        let (w, h, _) = decode(&previews.join(name));
        assert!(w > 0 && h > 0);
    }
    assert_eq!(std::fs::read_dir(&previews).unwrap().count(), 2);

    // A preview whose name a folder holds is refused before any work (as
    // the single-file mode does): nothing is segmented, the folder named.
    let outbox2 = dir.path().join("out2");
    let previews2 = dir.path().join("previews2");
    std::fs::create_dir_all(previews2.join("b.png")).unwrap();
    let r = segment(&model, &inbox, &outbox2, &previews2);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("b.png") && err.contains("is a folder"),
        "{err}"
    );
    assert!(!outbox2.join("a.nii.gz").exists());
    assert!(!previews2.join("a.png").exists());
}

#[test]
fn failed_preview_keeps_the_segmentation_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let out = dir.path().join("mask.nii.gz");

    // A folder where the PNG should go is refused before any work.
    let folder = dir.path().join("taken.png");
    std::fs::create_dir(&folder).unwrap();
    let r = segment(&model, &t1_2mm(), &out, &folder);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("taken.png") && err.contains("folder"), "{err}");
    assert!(!out.exists());

    // procfs takes no new files, even from root: the preview fails only
    // after the segmentation was written.
    if cfg!(target_os = "linux") {
        let preview = Path::new("/proc/infl8-preview-test.png");
        let r = segment(&model, &t1_2mm(), &out, preview);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains("/proc/infl8-preview-test.png") && err.contains("mask.nii.gz was written"),
            "{err}"
        );
        assert!(
            out.is_file(),
            "the segmentation must survive a failed preview"
        );
        nifti_io::read_volume(&out, &ReadLimits::default()).unwrap();
    }
}
