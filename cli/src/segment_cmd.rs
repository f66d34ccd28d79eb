//! `infl8 segment`: one volume or a folder of them, in this process or
//! with each volume in a worker process (`--isolation`, see
//! [`crate::isolate`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use infl8_core::fsio;
use infl8_core::nifti_io::ReadLimits;
use infl8_core::preview::{self, PreviewOptions};
use infl8_core::segment::SegmentReport;
use infl8_core::volume::Volume;
use ndarray::ArrayView3;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{error, info, warn};

use infl8_core::engine::{self, Engine};

use crate::commands::{is_nifti, log_path, log_safe, nifti_stem, settings_for};
use crate::flags::{Isolation, SegmentArgs};
use crate::isolate::{Ended, WorkerCommand, say, say_loaded};

/// One volume to segment and where its results go (also what a worker
/// process is handed).
#[derive(Debug, Serialize, Deserialize)]
struct Job {
    input: PathBuf,
    output: PathBuf,
    logits: Option<PathBuf>,
    preview: Option<PathBuf>,
    /// `input` is a folder holding a DICOM series.
    #[serde(default)]
    dicom: bool,
    /// The DICOM series to take (SeriesInstanceUID); the largest if none.
    #[serde(default)]
    series: Option<String>,
}

/// `name.nii.gz` / `name.nii` -> `name.png`.
fn preview_name(input_name: &std::ffi::OsStr) -> String {
    format!("{}.png", nifti_stem(input_name))
}

/// The one job of a folder that holds a DICOM series and no NIfTI file:
/// one volume, so the outputs are files.
fn dicom_job(a: &SegmentArgs) -> Result<Job> {
    for p in std::iter::once(&a.output)
        .chain(a.save_logits.as_ref())
        .chain(a.preview.as_ref())
    {
        if p.is_dir() {
            bail!(
                "{} is a DICOM series, one volume: {} must be a file name, not a folder",
                a.input.display(),
                p.display()
            );
        }
        if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create folder {}", parent.display()))?;
        }
    }
    if !is_nifti(&a.output) {
        bail!(
            "output {}: the labels of a DICOM series are written as NIfTI; name it .nii.gz",
            a.output.display()
        );
    }
    Ok(Job {
        input: a.input.clone(),
        output: a.output.clone(),
        logits: a.save_logits.clone(),
        preview: a.preview.clone(),
        dicom: true,
        series: a.series.clone(),
    })
}

/// A folder with no NIfTI file in it but DICOM images.
fn holds_dicom_only(dir: &Path) -> Result<bool> {
    let mut any_nifti = false;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        any_nifti |= p.is_file() && is_nifti(&p);
    }
    Ok(!any_nifti && infl8_dicom::scan_folder(dir).is_ok())
}

/// The jobs for a file or a folder.
fn jobs(a: &SegmentArgs) -> Result<Vec<Job>> {
    if a.input.is_dir() && holds_dicom_only(&a.input)? {
        return Ok(vec![dicom_job(a)?]);
    }
    if let Some(uid) = &a.series {
        bail!(
            "--series {uid}: {} is not a folder of DICOM images",
            a.input.display()
        );
    }
    if !a.input.is_dir() {
        if !a.input.exists() {
            bail!("input {} does not exist", a.input.display());
        }
        if a.output.is_dir() {
            bail!(
                "output {} is a folder but the input is a file: give an output file name",
                a.output.display()
            );
        }
        if let Some(p) = a.preview.as_ref().filter(|p| p.is_dir()) {
            bail!(
                "preview {} is a folder but the input is a file: give a .png file name",
                p.display()
            );
        }
        for p in std::iter::once(&a.output)
            .chain(a.save_logits.as_ref())
            .chain(a.preview.as_ref())
        {
            if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create folder {}", parent.display()))?;
            }
        }
        return Ok(vec![Job {
            input: a.input.clone(),
            output: a.output.clone(),
            logits: a.save_logits.clone(),
            preview: a.preview.clone(),
            dicom: false,
            series: None,
        }]);
    }
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("cannot create output folder {}", a.output.display()))?;
    if let Some(l) = &a.save_logits {
        std::fs::create_dir_all(l)
            .with_context(|| format!("cannot create logits folder {}", l.display()))?;
    }
    if let Some(p) = &a.preview {
        std::fs::create_dir_all(p)
            .with_context(|| format!("cannot create preview folder {}", p.display()))?;
    }
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&a.input)
        .with_context(|| format!("cannot list {}", a.input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_nifti(p))
        .collect();
    inputs.sort();
    if inputs.is_empty() {
        bail!(
            "no .nii or .nii.gz files, and no DICOM series, in {}",
            a.input.display()
        );
    }
    let jobs: Vec<Job> = inputs
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_owned();
            Some(Job {
                output: a.output.join(&name),
                logits: a.save_logits.as_ref().map(|d| d.join(&name)),
                preview: a.preview.as_ref().map(|d| d.join(preview_name(&name))),
                input: p,
                dicom: false,
                series: None,
            })
        })
        .collect();
    // `x.nii` and `x.nii.gz` would both preview as `x.png`: refuse rather
    // than let one silently replace the other.
    let mut seen = std::collections::HashMap::new();
    for j in &jobs {
        if let Some(p) = &j.preview
            && let Some(other) = seen.insert(p, &j.input)
        {
            bail!(
                "{} and {} would both write the preview {}",
                other.display(),
                j.input.display(),
                p.display()
            );
        }
    }
    Ok(jobs)
}

/// Every file the run will write can be written, checked before the work:
/// a symbolic link is removed first when `--replace-symlinks` asks, else
/// refused (as is a folder or a name too long), a device is written through.
fn check_targets(a: &SegmentArgs, jobs: &[Job]) -> Result<()> {
    let outputs = jobs
        .iter()
        .flat_map(|j| [Some(&j.output), j.logits.as_ref(), j.preview.as_ref()])
        .chain([a.report.as_ref()])
        .flatten();
    for p in outputs {
        let is_link = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
        if is_link && a.replace_symlinks {
            std::fs::remove_file(p)
                .with_context(|| format!("cannot remove the symbolic link {}", p.display()))?;
        }
        fsio::check_target(p)?;
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// How one volume ended.
#[derive(Debug, Serialize, Deserialize)]
struct Done {
    report: SegmentReport,
    /// Why the preview could not be written (the segmentation was).
    preview_error: Option<String>,
}

/// Segments the `i`-th job, in one way or the other.
type RunOne<'a> = Box<dyn FnMut(usize, &Job) -> Result<Done, Failure> + 'a>;

/// Why a volume has no result.
enum Failure {
    /// This volume's fault (or its plugin's on it): the others go on.
    Volume(anyhow::Error),
    /// Nothing can run (the model does not load): the run stops.
    Run(anyhow::Error),
}

pub fn segment(a: SegmentArgs) -> Result<ExitCode> {
    if let Some(job) = &a.worker_job {
        return Ok(worker(&a, job));
    }
    let settings = settings_for(&a.runtime, &a.layer())?;
    // Before any output exists: a report that cannot be written must not be
    // found out only after every volume was segmented.
    if let Some(r) = &a.report
        && r.is_dir()
    {
        bail!(
            "report {} is a folder: give a file name (one JSON file lists every volume)",
            r.display()
        );
    }
    let jobs = jobs(&a)?;
    check_targets(&a, &jobs)?;
    for j in &jobs {
        if same_file(&j.input, &j.output) {
            bail!("output {} would overwrite the input", j.output.display());
        }
        if let Some(p) = &j.preview {
            if same_file(&j.input, p) {
                bail!("preview {} would overwrite the input", p.display());
            }
            if p == &j.output || same_file(&j.output, p) {
                bail!("preview {} would overwrite the segmentation", p.display());
            }
        }
    }
    let isolated = match a.isolation {
        Isolation::Auto => settings.limits.timeout().is_some(),
        Isolation::Process => true,
        Isolation::Off => false,
    };
    let n = jobs.len();
    let label = |i: usize, job: &Job| {
        format!(
            "[{}/{n}] {}",
            i + 1,
            log_safe(&job.input.file_name().unwrap_or_default().to_string_lossy())
        )
    };
    let mut run_one: RunOne = if isolated {
        let worker = WorkerCommand {
            exe: std::env::current_exe().context("cannot find the infl8 executable")?,
            args: std::env::args_os().skip(1).collect(),
            timeout: settings.limits.timeout(),
            // Ctrl-C ends this process, and the worker with it
            // (PR_SET_PDEATHSIG): nothing to wait for.
            stop_grace: None,
        };
        let timeout_s = settings.limits.timeout_s;
        Box::new(move |i, job| in_worker(&worker, timeout_s, job, &label(i, job)))
    } else {
        let prepared = engine::open(&settings, &a.model)?;
        let limits = settings.limits.read_limits();
        Box::new(move |i, job| {
            in_process(&prepared, &limits, job, &label(i, job)).map_err(Failure::Volume)
        })
    };
    let mut reports: Vec<SegmentReport> = Vec::new();
    let mut failures = 0usize;
    let mut preview_failures = 0usize;
    // With a single input the failure becomes the command's error, after
    // the report is written.
    let mut single_preview_error = None;
    for (i, job) in jobs.iter().enumerate() {
        match run_one(i, job) {
            Ok(Done {
                report,
                preview_error,
            }) => {
                if let Some(e) = preview_error {
                    preview_failures += 1;
                    let msg = format!(
                        "preview failed (the segmentation {} was written): {e}",
                        report.output.display()
                    );
                    if n == 1 {
                        single_preview_error = Some(msg);
                    } else {
                        error!("{}", log_safe(&msg));
                    }
                }
                reports.push(report);
            }
            Err(Failure::Run(e)) => return Err(e),
            Err(Failure::Volume(e)) => {
                failures += 1;
                if n == 1 {
                    return Err(e);
                }
                let reason = crate::error_chain(&e);
                error!("{}", log_safe(&reason));
                // Folder mode: the report lists the failures with the rest.
                reports.push(SegmentReport {
                    input: job.input.clone(),
                    output: job.output.clone(),
                    error: Some(reason),
                    ..SegmentReport::default()
                });
            }
        }
    }
    if let Some(path) = &a.report {
        let json = serde_json::to_string_pretty(&reports)?;
        fsio::write_atomic(path, json.as_bytes())?;
    }
    if let Some(msg) = single_preview_error {
        bail!(msg);
    }
    if failures > 0 {
        eprintln!("{failures} of {n} volumes failed (see the errors above)");
    }
    if preview_failures > 0 {
        eprintln!(
            "{preview_failures} of {n} previews failed; their segmentations were written \
             (see the errors above)"
        );
    }
    if failures > 0 || preview_failures > 0 {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// One volume with the model this process loaded, a progress bar labelled
/// `label` on stderr while it runs.
/// The series of a DICOM folder as a volume (the one named, or the
/// largest), logged like a NIfTI input's header.
fn read_dicom(dir: &Path, series: Option<&str>) -> Result<Volume> {
    let all = infl8_dicom::scan_folder(dir)?;
    let chosen = infl8_dicom::choose_series(&all, series, dir)?;
    let vol = infl8_dicom::read_series(chosen)?;
    info!(
        input = %log_path(dir),
        series = %log_safe(&chosen.uid),
        modality = %log_safe(&chosen.modality),
        slices = chosen.files.len(),
        dims = ?vol.dims(),
        "DICOM series read"
    );
    Ok(vol)
}

fn in_process(prepared: &Engine, limits: &ReadLimits, job: &Job, label: &str) -> Result<Done> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} windows, {elapsed_precise} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let mut preview_result = None;
    let written = |vol: &Volume, labels: ArrayView3<u8>| {
        if let Some(path) = &job.preview {
            let opts = PreviewOptions::default();
            preview_result = Some(preview::write_preview_png(path, vol, labels, &opts));
        }
    };
    let (input, output, logits) = (&job.input, &job.output, job.logits.as_deref());
    let result = if job.dicom {
        let t0 = Instant::now();
        let vol = read_dicom(input, job.series.as_deref())?;
        let read_s = t0.elapsed().as_secs_f64();
        prepared.within_deadline(input, |s| {
            s.segment_volume_with(
                &vol, input, read_s, output, logits, limits, &progress, written,
            )
        })
    } else {
        prepared.within_deadline(input, |s| {
            s.segment_file_with(input, output, logits, limits, &progress, written)
        })
    };
    bar.finish_and_clear();
    let report = result?;
    info!(
        input = %log_path(&report.input),
        output = %log_path(&report.output),
        dims = ?report.dims,
        windows = report.windows,
        read_s = format!("{:.2}", report.read_s),
        infer_s = format!("{:.2}", report.infer_s),
        write_s = format!("{:.2}", report.write_s),
        label_voxels = ?report.label_voxels,
        "segmented"
    );
    let preview_error = match (preview_result, &job.preview) {
        (Some(Ok(())), Some(p)) => {
            info!(preview = %log_path(p), "preview written");
            None
        }
        (Some(Err(e)), _) => Some(e.to_string()),
        _ => None,
    };
    Ok(Done {
        report,
        preview_error,
    })
}

/// The worker's job: the volume and its progress label.
#[derive(Serialize, Deserialize)]
struct WorkerJob {
    job: Job,
    label: String,
}

/// One volume in a worker process: what a crash or a hang of the plugin
/// does to it stays there, and a hang is killed at `limits.timeout_s`.
fn in_worker(
    worker: &WorkerCommand,
    timeout_s: f64,
    job: &Job,
    label: &str,
) -> Result<Done, Failure> {
    let spec = serde_json::to_string(&json!({"job": job, "label": label}))
        .map_err(|e| Failure::Run(e.into()))?;
    let end = worker
        .run("--worker-job", &spec, &|| false)
        .map_err(Failure::Run)?;
    let killed = !matches!(end.how, Ended::Exited(_)) || end.signal().is_some();
    if killed {
        // A write cut short leaves its temporary file: not ours to keep.
        for target in [Some(&job.output), job.logits.as_ref(), job.preview.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = fsio::remove_temporaries_of(target, end.pid) {
                warn!(path = %log_path(target), "cannot remove a killed worker's temporary file: {e}");
            }
        }
    }
    if let Ended::TimedOut(_) = end.how {
        return Err(Failure::Volume(anyhow::Error::msg(
            end.timeout_reason(&job.input, timeout_s),
        )));
    }
    if let Some(sig) = end.signal() {
        return Err(Failure::Volume(anyhow::Error::msg(
            end.crash_reason(&job.input, sig),
        )));
    }
    if let Some(done) = end.ok.as_ref() {
        return serde_json::from_value(done.clone())
            .context("the worker's result is unreadable")
            .map_err(Failure::Run);
    }
    let reason = match (end.error_message(), &end.how) {
        (Some(m), _) => m.to_owned(),
        (None, how) => format!(
            "{}: the worker process ended ({how:?}) without a result",
            job.input.display()
        ),
    };
    if end.loaded.is_none() {
        // The model did not load: every volume would fail the same way.
        return Err(Failure::Run(anyhow::Error::msg(reason)));
    }
    Err(Failure::Volume(anyhow::Error::msg(reason)))
}

/// The worker process of [`in_worker`]: loads the model, says so, segments
/// the one volume and says how it ended.
fn worker(a: &SegmentArgs, spec: &str) -> ExitCode {
    let result = (|| -> Result<Done> {
        let spec: WorkerJob = serde_json::from_str(spec).context("bad --worker-job")?;
        let settings = settings_for(&a.runtime, &a.layer())?;
        let prepared = engine::open(&settings, &a.model)?;
        say_loaded(&prepared.backend, &prepared.library);
        in_process(
            &prepared,
            &settings.limits.read_limits(),
            &spec.job,
            &spec.label,
        )
    })();
    match result {
        Ok(done) => {
            say(&json!({"ok": done}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&json!({"error": crate::error_chain(&e)}));
            ExitCode::FAILURE
        }
    }
}
