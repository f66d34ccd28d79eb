//! `infl8 segment`'s outputs against hostile paths: the longest legal file
//! name, a character device, a FIFO and a symbolic link where the outputs
//! go (issue 21, items 1 and 2). Every write goes through `fsio`.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{example_model, infl8, ok, s, t1_2mm};

fn segment(model: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let input = t1_2mm();
    let mut args = vec![
        "segment",
        "--model",
        s(model),
        "--input",
        s(&input),
        "--output",
        s(output),
    ];
    args.extend_from_slice(extra);
    infl8(&args)
}

fn mknod_char(path: &Path, major: u32, minor: u32) -> u64 {
    let dev = libc_makedev(major, minor);
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mknod on a path in the test's own temporary folder.
    let r = unsafe { mknod(c.as_ptr(), 0o020000 | 0o666, dev) };
    assert_eq!(
        r,
        0,
        "mknod {} (the tests run as root): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    dev
}

// The suite does not depend on libc: the two calls it needs.
unsafe extern "C" {
    fn mknod(path: *const std::ffi::c_char, mode: u32, dev: u64) -> i32;
    fn mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
}

/// glibc's `makedev` for Linux.
fn libc_makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (u64::from(major), u64::from(minor));
    ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn an_output_name_of_243_bytes_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let name = format!("{}.nii.gz", "N".repeat(236));
    assert_eq!(name.len(), 243);
    let output = out_dir.join(&name);
    ok(&segment(&model, &output, &[]));
    let v = nifti_io::read_volume(&output, &ReadLimits::default()).unwrap();
    assert!(v.data.iter().any(|&l| l != 0.0));
    assert_eq!(listing(&out_dir), [name], "no temporary left");

    // A name past NAME_MAX is refused, clearly and before the work.
    let too_long = out_dir.join(format!("{}.nii.gz", "N".repeat(250)));
    let out = segment(&dir.path().join("missing.onnx"), &too_long, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("257 bytes") && err.contains("255"), "{err}");
}

#[test]
fn a_character_device_as_output_or_report_stays_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    // A copy of /dev/null (1, 3).
    let fakenull = dir.path().join("fakenull");
    let dev = mknod_char(&fakenull, 1, 3);
    let report = dir.path().join("fakereport");
    mknod_char(&report, 1, 3);
    ok(&segment(&model, &fakenull, &["--report", s(&report)]));
    for p in [&fakenull, &report] {
        let m = fs::symlink_metadata(p).unwrap();
        assert!(
            m.file_type().is_char_device(),
            "{} was replaced",
            p.display()
        );
        assert_eq!(m.rdev(), dev);
    }
    assert_eq!(
        listing(dir.path()),
        ["example.onnx", "fakenull", "fakereport"]
    );
}

#[test]
fn a_fifo_as_report_is_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let fifo = dir.path().join("report.pipe");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo on a path in the test's own temporary folder.
    assert_eq!(unsafe { mkfifo(c.as_ptr(), 0o644) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read_to_string(&fifo).unwrap())
    };
    let output = dir.path().join("seg.nii.gz");
    ok(&segment(&model, &output, &["--report", s(&fifo)]));
    let text = reader.join().unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{text}");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn a_symlink_is_refused_before_the_work_unless_replace_symlinks_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let precious: PathBuf = dir.path().join("precious.txt");
    fs::write(&precious, b"keep me").unwrap();
    let link = dir.path().join("seg.nii.gz");
    std::os::unix::fs::symlink(&precious, &link).unwrap();

    // A model that does not exist: the link must be what is refused, so
    // it was checked before any work.
    let out = segment(&dir.path().join("missing.onnx"), &link, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("symbolic link") && err.contains("--replace-symlinks"),
        "{err}"
    );
    assert!(fs::symlink_metadata(&link).unwrap().is_symlink());

    ok(&segment(&model, &link, &["--replace-symlinks"]));
    assert!(fs::symlink_metadata(&link).unwrap().is_file());
    nifti_io::read_volume(&link, &ReadLimits::default()).unwrap();
    assert_eq!(fs::read(&precious).unwrap(), b"keep me");
}
