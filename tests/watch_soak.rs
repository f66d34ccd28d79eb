//! Soak test of `infl8 watch`: 200 small volumes cut from the real 2 mm
//! MNI152 T1 arrive in the inbox of a running service while it is killed
//! (SIGKILL) and restarted at random moments and stopped once with SIGTERM.
//! Some inputs are poison: truncated, garbage, empty, NaN voxels, too many
//! voxels, a 2 TB sparse file (over the default `limits.max_input_bytes`),
//! carrying a marker voxel the `faulty-marker` backend refuses to run, or
//! one on which that backend hangs for good (killed at `limits.timeout_s`).
//! Some good ones have names of 250 bytes. They arrive three ways: written
//! at once, written slowly as `*.part` then renamed, and written in chunks
//! under their final name (taken only once their size is stable). For a
//! few seconds the outbox is read-only (immutable): the inputs met then
//! must wait, not fail.
//!
//! At the end every good input must have exactly one complete output (a
//! readable label map on its grid that is the segmentation of *its* voxels)
//! and one report, every bad one exactly one failure record, the journal
//! one outcome per input, and nothing may be left over: no temporary file,
//! no input in the inbox.
//!
//! Bounded in time: the whole test has a hard deadline and fails with what
//! is missing rather than hanging. `INFL8_SOAK_SEED` replays another seed,
//! `INFL8_SOAK_VOLUMES` scales the number of volumes (CI with less time),
//! `INFL8_SOAK_KEEP` keeps its folder (inbox, outbox, the service's log).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use infl8_core::nifti_io::{self, DataType, ReadLimits};
use infl8_core::volume::Volume;
use infl8_suite::{example_model, plugin_lib, s, t1_2mm};
use nalgebra::Matrix4;
use ndarray::Array4;
use serde_json::Value;

/// The whole test, generation to checks.
const DEADLINE: Duration = Duration::from_secs(240);
/// `watch.stable_secs`: above every pause of a chunked writer (150 ms).
const STABLE_SECS: f64 = 1.5;
/// The marker voxel, and the `faulty-marker` threshold in z-score units:
/// one voxel of 1e7 in at least 12^3 voxels has a z-score of at least 41;
/// the good volumes are drawn with every |z| under `MAX_GOOD_Z`.
const MARKER: f32 = 1e7;
const MARKER_ABOVE: f64 = 20.0;
/// A voxel of -`MARKER` makes `faulty-marker` hang (z-score at most -41).
const HANG_BELOW: f64 = -20.0;
/// `limits.timeout_s`: a hanging volume costs this and a second.
const TIMEOUT_S: f64 = 5.0;
/// The sparse file's size: far over the default `limits.max_input_bytes`
/// (4 GiB), a few KiB on disk.
const SPARSE_LEN: u64 = 2 << 40;
/// The longest names: 250 bytes, and 255 with `.part`.
const LONG_NAME: usize = 250;
const MAX_GOOD_Z: f64 = 8.0;
/// `limits.max_voxels`, which bounds the file's grid and the model's grid
/// alike: the good volumes' model grids have at most 47^3 = 103823 voxels
/// (24^3 at 4 mm, resampled to the example model's 2 mm).
const MAX_VOXELS: usize = 110_000;

/// SplitMix64: seeded, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        infl8_core::rng::splitmix64(&mut self.0)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Good,
    /// Good, with a name of `LONG_NAME` bytes.
    LongName,
    Truncated,
    Garbage,
    Empty,
    Marker,
    NonFinite,
    TooLarge,
    /// The bytes of a small good volume, then a hole to `SPARSE_LEN`.
    Sparse,
    Hang,
}

impl Kind {
    fn is_good(self) -> bool {
        matches!(self, Kind::Good | Kind::LongName)
    }
}

#[derive(Clone, Debug)]
enum Delivery {
    /// One `fs::write` under the final name.
    AtOnce,
    /// Chunks into `NAME.part`, pauses between them (some longer than
    /// `stable_secs`: a `.part` is never taken), then a rename.
    SlowPart { pauses_ms: Vec<u64> },
    /// Chunks under the final name, pauses shorter than `stable_secs`.
    Chunked { pauses_ms: Vec<u64> },
}

struct Input {
    name: String,
    bytes: Vec<u8>,
    kind: Kind,
    delivery: Delivery,
    /// Wait before the writer starts on it.
    delay_ms: u64,
    /// Good inputs: the volume, to check the output against.
    volume: Option<Volume>,
}

/// A sub-block of the T1, every `step`-th voxel (spacing 2 or 4 mm),
/// intensities scaled and shifted.
fn cut(t1: &Volume, rng: &mut Rng, dims: [usize; 3], step: usize) -> Volume {
    let full = t1.dims();
    // Inside the head: a block of mostly air would make its z-scores
    // extreme and its mask trivial.
    let margin = [14, 14, 14];
    let mut origin = [0usize; 3];
    for a in 0..3 {
        let span = dims[a] * step;
        let hi = full[a] - margin[a] - span;
        origin[a] = rng.range(margin[a] as u64, hi as u64) as usize;
    }
    let scale = 0.5 + 2.0 * rng.unit();
    let offset = 50.0 * rng.unit();
    let data = Array4::from_shape_fn((1, dims[0], dims[1], dims[2]), |(_, i, j, k)| {
        let v = t1.data[[
            0,
            origin[0] + step * i,
            origin[1] + step * j,
            origin[2] + step * k,
        ]];
        (f64::from(v) * scale + offset) as f32
    });
    let mut shift = Matrix4::identity();
    for a in 0..3 {
        shift[(a, a)] = step as f64;
        shift[(a, 3)] = origin[a] as f64;
    }
    Volume::new(data, t1.affine * shift)
}

/// Largest |z-score| of the volume's voxels (population std, as the
/// runtime's z-score normalisation).
fn max_abs_z(v: &Volume) -> f64 {
    let n = v.data.len() as f64;
    let mean = v.data.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .data
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    if var <= 0.0 {
        return f64::INFINITY;
    }
    v.data
        .iter()
        .map(|&x| ((f64::from(x) - mean) / var.sqrt()).abs())
        .fold(0.0, f64::max)
}

fn encode(stage: &Path, name: &str, v: &Volume, dt: DataType) -> Vec<u8> {
    let p = stage.join(name);
    nifti_io::write_volume(&p, v, dt).expect("write a test volume");
    let bytes = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn delivery(rng: &mut Rng) -> Delivery {
    let r = rng.unit();
    let pauses = |rng: &mut Rng, lo: u64, hi: u64| -> Vec<u64> {
        (0..rng.range(2, 4)).map(|_| rng.range(lo, hi)).collect()
    };
    if r < 0.4 {
        Delivery::AtOnce
    } else if r < 0.7 {
        let mut pauses_ms = pauses(rng, 50, 300);
        if rng.chance(0.15) {
            // Longer than stable_secs: only the `.part` name keeps it out.
            pauses_ms[0] = 1500;
        }
        Delivery::SlowPart { pauses_ms }
    } else {
        Delivery::Chunked {
            pauses_ms: pauses(rng, 20, 150),
        }
    }
}

fn inputs(n: usize, rng: &mut Rng, stage: &Path) -> Vec<Input> {
    let limits = ReadLimits::default();
    let t1 = nifti_io::read_volume(&t1_2mm(), &limits).expect("read the T1");
    let t1_max = t1.data.iter().cloned().fold(0.0f32, f32::max);
    // Three in four are good; the rest spread over the kinds of poison.
    let bad = [
        (Kind::Truncated, 6),
        (Kind::Garbage, 5),
        (Kind::Empty, 2),
        (Kind::Marker, 8),
        (Kind::NonFinite, 2),
        (Kind::TooLarge, 2),
        (Kind::Sparse, 1),
        (Kind::Hang, 1),
    ];
    let per: usize = bad.iter().map(|b| b.1).sum();
    let mut kinds = Vec::new();
    for &(k, w) in &bad {
        // At least one of each, however few volumes.
        kinds.extend(std::iter::repeat_n(k, (n * w).div_ceil(per * 4).max(1)));
    }
    kinds.extend(std::iter::repeat_n(Kind::LongName, (n / 50).max(1)));
    assert!(kinds.len() < n / 2, "{n} volumes are too few for a soak");
    kinds.resize(n, Kind::Good);
    // Shuffle (Fisher-Yates) so poison arrives among good inputs.
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.range(0, i as u64) as usize);
    }
    let mut out = Vec::with_capacity(n);
    for (i, kind) in kinds.into_iter().enumerate() {
        let gz = rng.chance(0.6);
        let ext = if gz { ".nii.gz" } else { ".nii" };
        let ext = if kind == Kind::Sparse { ".nii" } else { ext };
        let mut name = format!("v{i:03}-{}", format!("{kind:?}").to_lowercase());
        if kind == Kind::LongName {
            let pad = LONG_NAME - name.len() - ext.len();
            name.push_str(&"n".repeat(pad));
        }
        name.push_str(ext);
        let good_volume = |rng: &mut Rng, step: usize| loop {
            let dims = [0; 3].map(|_: usize| rng.range(12, 24) as usize);
            let v = cut(&t1, rng, dims, step);
            if max_abs_z(&v) < MAX_GOOD_Z {
                break v;
            }
        };
        // Integer voxels for some: the scale keeps them inside i16.
        let dtype = |rng: &mut Rng, v: &Volume| {
            let max = v.data.iter().cloned().fold(0.0f32, f32::max);
            if rng.chance(0.4) && max < 30_000.0 && t1_max > 0.0 {
                DataType::I16
            } else {
                DataType::F32
            }
        };
        let (bytes, volume) = match kind {
            Kind::Good | Kind::LongName => {
                let step = if rng.chance(0.3) { 2 } else { 1 };
                let v = good_volume(rng, step);
                let dt = dtype(rng, &v);
                let bytes = encode(stage, &name, &v, dt);
                // The checks compare against what the file holds.
                let v = nifti_io::read_volume_bytes(Path::new(&name), &bytes, &limits).unwrap();
                (bytes, Some(v))
            }
            Kind::Truncated => {
                let v = good_volume(rng, 1);
                let bytes = encode(stage, &name, &v, DataType::F32);
                let keep = bytes.len() * rng.range(30, 80) as usize / 100;
                (bytes[..keep].to_vec(), None)
            }
            Kind::Garbage => {
                let len = rng.range(400, 3000) as usize;
                let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                // gz: a sound gzip stream around a garbage header.
                (if gz { gzip(&junk) } else { junk }, None)
            }
            Kind::Empty => (Vec::new(), None),
            Kind::Marker => {
                let mut v = good_volume(rng, 1);
                let d = v.dims();
                let at = [0, 1, 2].map(|a| rng.range(0, d[a] as u64 - 1) as usize);
                v.data[[0, at[0], at[1], at[2]]] = MARKER;
                (encode(stage, &name, &v, DataType::F32), None)
            }
            Kind::NonFinite => {
                let mut v = good_volume(rng, 1);
                v.data[[0, 3, 4, 5]] = f32::NAN;
                // write_volume refuses NaN: write finite, then patch the
                // voxel's bytes in an uncompressed copy.
                // Negative: no voxel of the (non-negative) T1 cut has it.
                let probe = -98765.43f32;
                v.data[[0, 3, 4, 5]] = probe;
                let raw = encode(stage, &name.replace(".gz", ""), &v, DataType::F32);
                let pos = raw
                    .windows(4)
                    .position(|w| w == probe.to_le_bytes())
                    .expect("the probe voxel");
                let mut raw = raw;
                raw[pos..pos + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                (if gz { gzip(&raw) } else { raw }, None)
            }
            Kind::TooLarge => {
                let v = cut(&t1, rng, [50, 50, 50], 1);
                assert!(v.voxel_count() > MAX_VOXELS);
                (encode(stage, &name, &v, DataType::I16), None)
            }
            Kind::Sparse => (
                encode(stage, &name, &good_volume(rng, 1), DataType::F32),
                None,
            ),
            Kind::Hang => {
                let mut v = good_volume(rng, 1);
                let d = v.dims();
                let at = [0, 1, 2].map(|a| rng.range(0, d[a] as u64 - 1) as usize);
                v.data[[0, at[0], at[1], at[2]]] = -MARKER;
                (encode(stage, &name, &v, DataType::F32), None)
            }
        };
        let delivery = if bytes.is_empty() || kind == Kind::Sparse {
            Delivery::AtOnce
        } else {
            delivery(rng)
        };
        out.push(Input {
            name,
            bytes,
            kind,
            delivery,
            delay_ms: rng.range(0, 60),
            volume,
        });
    }
    out
}

fn chunks(bytes: &[u8], n: usize) -> Vec<&[u8]> {
    let size = bytes.len().div_ceil(n).max(1);
    bytes.chunks(size).collect()
}

fn deliver(inbox: &Path, input: &Input) -> std::io::Result<()> {
    let write_chunked = |path: &Path, pauses: &[u64]| -> std::io::Result<()> {
        let mut f = fs::File::create(path)?;
        let parts = chunks(&input.bytes, pauses.len() + 1);
        for (i, part) in parts.iter().enumerate() {
            f.write_all(part)?;
            f.flush()?;
            if let Some(p) = pauses.get(i) {
                std::thread::sleep(Duration::from_millis(*p));
            }
        }
        Ok(())
    };
    let dest = inbox.join(&input.name);
    if input.kind == Kind::Sparse {
        // The hole first, then the bytes: never a stable short file.
        let f = fs::File::create(&dest)?;
        f.set_len(SPARSE_LEN)?;
        return std::os::unix::fs::FileExt::write_all_at(&f, &input.bytes, 0);
    }
    match &input.delivery {
        Delivery::AtOnce => fs::write(&dest, &input.bytes),
        Delivery::SlowPart { pauses_ms } => {
            let part = inbox.join(format!("{}.part", input.name));
            write_chunked(&part, pauses_ms)?;
            fs::rename(&part, &dest)
        }
        Delivery::Chunked { pauses_ms } => write_chunked(&dest, pauses_ms),
    }
}

/// One `infl8 watch` process at a time, killed when the test ends.
struct Service {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Service {
    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.starts += 1;
        writeln!(&log, "----- start {} -----", self.starts).unwrap();
        let mut cmd = infl8_suite::command("infl8");
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("start infl8 watch"));
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Exited on its own (it should not, while the test runs).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to the service and its workers, as systemd's default
    /// `KillMode=control-group` sends it; waits for the exit.
    fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.pid();
        let mut pids = vec![pid];
        pids.extend(children(pid));
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -TERM {}", list.join(" ")))
            .status()
            .expect("run kill");
        assert!(st.success() || pids.len() > 1, "kill -TERM {pid} failed");
        let until = Instant::now() + within;
        let mut c = self.child.take().unwrap();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > until {
                let _ = c.kill();
                let _ = c.wait();
                panic!("infl8 watch did not stop within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Processes whose parent is `pid` (its workers).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid)
            && let Some(child) = e.file_name().to_str().and_then(|n| n.parse().ok())
        {
            out.push(child);
        }
    }
    out
}

/// The journal's complete lines (a last line being written is skipped).
fn journal(outbox: &Path) -> Vec<Value> {
    let Ok(text) = fs::read_to_string(outbox.join(".infl8/journal.jsonl")) else {
        return Vec::new();
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l}: {e}")))
        .collect()
}

/// Outcome records (`done` / `failed`) per input name.
fn outcomes(records: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in records {
        let ev = r["event"].as_str().unwrap_or_default();
        if ev == "done" || ev == "failed" {
            m.entry(r["name"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(ev.to_owned());
        }
    }
    m
}

/// Names taken and not finished.
fn interrupted(records: &[Value]) -> BTreeSet<String> {
    let mut open = BTreeSet::new();
    for r in records {
        let name = r["name"].as_str().unwrap_or_default().to_owned();
        match r["event"].as_str() {
            Some("taken") => {
                open.insert(name);
            }
            _ => {
                open.remove(&name);
            }
        }
    }
    open
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn extension(name: &str) -> &str {
    if name.ends_with(".nii.gz") {
        ".nii.gz"
    } else {
        ".nii"
    }
}

/// The service under test and the test's hard deadline: every wait goes
/// through [`Soak::nap`], which fails the test (with the service's log)
/// past the deadline or when the service exits on its own.
struct Soak {
    svc: Service,
    deadline: Instant,
    seed: u64,
    outbox: PathBuf,
}

impl Soak {
    fn fail(&mut self, why: String) -> ! {
        self.svc.kill9();
        panic!(
            "{why}\n(seed {}; last lines of the service's log {}:)\n{}",
            self.seed,
            self.svc.log.display(),
            log_tail(&self.svc.log)
        );
    }

    fn nap(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            if Instant::now() > self.deadline {
                self.fail(format!("the deadline of {DEADLINE:?} passed"));
            }
            if let Some(st) = self.svc.exited() {
                self.svc.child = None;
                self.fail(format!("infl8 watch exited on its own: {st}"));
            }
            if Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the running service says it is on, once its own status file
    /// (not one left by a killed process) says so.
    fn current_volume(&self) -> Option<String> {
        let text = fs::read_to_string(self.outbox.join(".infl8/status.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        if v["pid"].as_u64() != Some(u64::from(self.svc.pid())) {
            return None;
        }
        v["current"].as_str().map(str::to_owned)
    }
}

/// `chattr +i` on a folder while it lives: no file can be created, renamed
/// or removed in it.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "chattr +i {} (root, on a file system with attributes) is needed",
            dir.display()
        );
        Immutable(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Tells the writers to stop when the test ends early.
struct Abort(Arc<AtomicBool>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn watch_survives_kills_poison_and_slow_writers() {
    let t0 = Instant::now();
    let seed: u64 = std::env::var("INFL8_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1_6f18_50a4);
    let n: usize = std::env::var("INFL8_SOAK_VOLUMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    eprintln!("soak: seed {seed}, {n} volumes (INFL8_SOAK_SEED / INFL8_SOAK_VOLUMES)");
    let mut rng = Rng(seed);

    let mut tmp = tempfile::tempdir().unwrap();
    // To look at the inbox, outbox and log after a run.
    if std::env::var_os("INFL8_SOAK_KEEP").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("soak: keeping {}", tmp.path().display());
    }
    let root = tmp.path();
    let (inbox, outbox, stage, plugins) = (
        root.join("inbox"),
        root.join("outbox"),
        root.join("stage"),
        root.join("plugins"),
    );
    for d in [&inbox, &stage, &plugins] {
        fs::create_dir_all(d).unwrap();
    }
    // The test plugins are named so that discovery skips them; a copy under
    // a plugin's name in the profile's plugin_dirs is found like any other.
    fs::copy(
        plugin_lib("infl8test_faulty"),
        plugins.join(format!(
            "{}infl8_soak_faulty{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )),
    )
    .unwrap();
    let model = example_model(root, 16);
    let profile = root.join("soak.toml");
    fs::write(
        &profile,
        format!(
            "backend = \"faulty-marker\"\n\
             plugin_dirs = [\"{}\"]\n\
             threads = 1\n\
             window_batch = 4\n\
             [model]\nzscore = true\n\
             [limits]\nmax_voxels = {MAX_VOXELS}\ntimeout_s = {TIMEOUT_S}\n\
             [watch]\nstable_secs = {STABLE_SECS}\npoll_ms = 50\nmove_inputs = true\n\
             # Above the number of kills: an input the kills keep hitting is\n\
             # not the input's fault here.\n\
             max_attempts = 50\n\
             [backend_options.faulty-marker]\nmarker_above = {MARKER_ABOVE}\n\
             hang_below = {HANG_BELOW}\n",
            s(&plugins)
        ),
    )
    .unwrap();

    let inputs = Arc::new(inputs(n, &mut rng, &stage));
    let mut by_kind = BTreeMap::new();
    for i in inputs.iter() {
        *by_kind.entry(i.kind).or_insert(0usize) += 1;
    }
    eprintln!(
        "soak: {by_kind:?} generated in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let mut soak = Soak {
        svc: Service {
            args: [
                "watch",
                "--inbox",
                s(&inbox),
                "--outbox",
                s(&outbox),
                "--model",
                s(&model),
                "--config",
                s(&profile),
            ]
            .map(str::to_owned)
            .to_vec(),
            log: root.join("watch.log"),
            child: None,
            starts: 0,
        },
        deadline: t0 + DEADLINE,
        seed,
        outbox: outbox.clone(),
    };
    soak.svc.start();
    // Three writers, so slow deliveries overlap.
    let abort = Arc::new(AtomicBool::new(false));
    let writers: Vec<JoinHandle<()>> = (0..3)
        .map(|w| {
            let (inputs, inbox, abort) = (inputs.clone(), inbox.clone(), abort.clone());
            std::thread::spawn(move || {
                for input in inputs.iter().skip(w).step_by(3) {
                    if abort.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(input.delay_ms));
                    if let Err(e) = deliver(&inbox, input) {
                        // After a failure the folder is being removed.
                        if abort.load(Ordering::SeqCst) {
                            return;
                        }
                        panic!("delivering {}: {e}", input.name);
                    }
                }
            })
        })
        .collect();
    let _abort = Abort(abort);

    // Six kill -9 and a SIGTERM (the fourth fault) at random moments of the
    // processing: once a random number of inputs are finished, plus a
    // random fraction of a volume's time. Tied to progress rather than to
    // the clock, they land among the volumes at any speed and any scale.
    let mut marks: Vec<usize> = (0..7)
        .map(|_| rng.range(n as u64 / 20, n as u64 * 4 / 5) as usize)
        .collect();
    marks.sort_unstable();
    let mut terminated_on = None;
    let mut hits = 0;
    for (round, mark) in marks.into_iter().enumerate() {
        while outcomes(&journal(&outbox)).len() < mark {
            soak.nap(Duration::from_millis(50));
        }
        soak.nap(Duration::from_millis(rng.range(0, 700)));
        // A volume takes tens of milliseconds here and the service mostly
        // waits for arrivals: half the kills wait for one to be taken and
        // strike a random few milliseconds into it.
        if round % 2 == 0 && round != 3 {
            let until = Instant::now() + Duration::from_secs(10);
            while soak.current_volume().is_none() && Instant::now() < until {
                soak.nap(Duration::ZERO);
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(rng.range(0, 25)));
        }
        if round == 3 {
            // SIGTERM with a volume in progress, so it has one to finish.
            let until = Instant::now() + Duration::from_secs(10);
            while soak.current_volume().is_none() && Instant::now() < until {
                soak.nap(Duration::ZERO);
                std::thread::sleep(Duration::from_millis(2));
            }
            let busy = soak.current_volume();
            let status = soak.svc.terminate(Duration::from_secs(10));
            if !status.success() {
                soak.fail(format!("SIGTERM: infl8 watch exited with {status}"));
            }
            let records = journal(&outbox);
            let open = interrupted(&records);
            if !open.is_empty() {
                soak.fail(format!(
                    "after SIGTERM, volumes were left unfinished: {open:?}"
                ));
            }
            // Finished within watch.stop_grace_s, or (a hanging one)
            // left for the next start, journalled as deferred.
            let deferred = |name: &str| {
                records
                    .iter()
                    .any(|r| r["event"] == "deferred" && r["name"] == name)
            };
            if let Some(name) = &busy
                && !outcomes(&records).contains_key(name)
                && !deferred(name)
            {
                soak.fail(format!(
                    "SIGTERM during {name}: it was neither finished nor left deferred"
                ));
            }
            terminated_on = busy;
        } else {
            hits += usize::from(soak.current_volume().is_some());
            soak.svc.kill9();
        }
        soak.nap(Duration::from_millis(rng.range(0, 300)));
        soak.svc.start();
        if round == 1 {
            // A few seconds of a read-only outbox (EPERM for root too): the
            // volumes met then wait in the inbox and are done afterwards.
            let ro = Immutable::set(&outbox);
            soak.nap(Duration::from_millis(2500));
            drop(ro);
        }
    }
    eprintln!(
        "soak: faults done at {:.1} s; {hits} of 6 kills hit a volume in progress, \
         SIGTERM while on {terminated_on:?}",
        t0.elapsed().as_secs_f64()
    );
    // The faults must have struck where they test something: three of the
    // kills and the SIGTERM waited (up to 10 s each) for a volume to be in
    // progress.
    if hits == 0 {
        soak.fail("no SIGKILL landed while a volume was in progress".into());
    }
    if terminated_on.is_none() {
        soak.fail("the SIGTERM did not arrive while a volume was in progress".into());
    }

    for w in writers {
        while !w.is_finished() {
            soak.nap(Duration::from_millis(50));
        }
        if w.join().is_err() {
            soak.fail("a writer failed (see its panic above)".into());
        }
    }
    eprintln!(
        "soak: all {n} inputs delivered at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    loop {
        let records = journal(&outbox);
        let done = outcomes(&records);
        let inbox_left: Vec<String> = names(&inbox)
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect();
        if done.len() >= n && inbox_left.is_empty() && interrupted(&records).is_empty() {
            break;
        }
        if Instant::now() + Duration::from_millis(200) > soak.deadline {
            let missing: Vec<&str> = inputs
                .iter()
                .map(|i| i.name.as_str())
                .filter(|n| !done.contains_key(*n))
                .collect();
            soak.fail(format!(
                "the deadline of {DEADLINE:?} passed with {} of {n} inputs finished; \
                 no outcome for {missing:?}; still in the inbox: {inbox_left:?}",
                done.len()
            ));
        }
        soak.nap(Duration::from_millis(100));
    }
    let status = soak.svc.terminate(Duration::from_secs(60));
    assert!(status.success(), "final SIGTERM: {status}");
    eprintln!(
        "soak: all finished and stopped at {:.1} s, {} starts",
        t0.elapsed().as_secs_f64(),
        soak.svc.starts
    );

    check_results(&inputs, &inbox, &outbox, &soak.svc.log);

    let st = infl8_suite::command("infl8")
        .args(["watch", "--status", "--outbox", s(&outbox)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success(), "{text}");
    let good: usize = by_kind
        .iter()
        .filter(|(k, _)| k.is_good())
        .map(|(_, n)| n)
        .sum();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
    };
    assert_eq!(field("done:"), good.to_string(), "{text}");
    assert_eq!(field("failed:"), (n - good).to_string(), "{text}");
    assert_eq!(field("queue:"), "0", "{text}");
    assert_eq!(field("state:"), "stopped", "{text}");
    eprintln!("soak: passed in {:.1} s", t0.elapsed().as_secs_f64());
}

/// Every good input: one output that is its segmentation and one report;
/// every bad one: one failure record; nothing else anywhere.
fn check_results(inputs: &[Input], inbox: &Path, outbox: &Path, log: &Path) {
    let ctx = || format!("(log: {})", log.display());
    let records = journal(outbox);
    let outcomes = outcomes(&records);
    let mut slots = BTreeMap::new();
    let mut shas = BTreeMap::new();
    for r in &records {
        if r["event"] == "taken" {
            let name = r["name"].as_str().unwrap().to_owned();
            let slot = r["slot"].as_str().unwrap().to_owned();
            let sha = r["sha256"].as_str().unwrap().to_owned();
            if let Some(old) = slots.insert(name.clone(), slot.clone()) {
                assert_eq!(old, slot, "{name}: two slots {}", ctx());
            }
            if let Some(old) = shas.insert(name.clone(), sha.clone()) {
                assert_eq!(old, sha, "{name}: two checksums {}", ctx());
            }
        }
    }
    assert!(
        names(inbox).is_empty(),
        "inbox not empty: {:?}",
        names(inbox)
    );
    let mut want_outbox: BTreeSet<String> = [".infl8", "done", "failed"].map(str::to_owned).into();
    let mut want_done = BTreeSet::new();
    let mut want_failed = BTreeSet::new();
    let limits = ReadLimits::default();
    let mut worst_agreement = 1.0f64;
    for input in inputs {
        let name = &input.name;
        let got = outcomes.get(name).cloned().unwrap_or_default();
        let slot = slots
            .get(name)
            .unwrap_or_else(|| panic!("{name} was never taken {}", ctx()));
        let ext = extension(name);
        let filed = format!("{slot}{ext}");
        if input.kind.is_good() {
            assert_eq!(got, ["done"], "{name}: outcomes {got:?} {}", ctx());
            let output = format!("{slot}_seg.nii.gz");
            let report = format!("{slot}.report.json");
            want_outbox.insert(output.clone());
            want_outbox.insert(report.clone());
            want_done.insert(filed.clone());
            let r: Value = serde_json::from_str(&fs::read_to_string(outbox.join(&report)).unwrap())
                .unwrap_or_else(|e| panic!("{report}: {e}"));
            assert_eq!(r["input"], name.as_str(), "{r}");
            assert_eq!(r["input_sha256"], shas[name].as_str(), "{r}");
            assert_eq!(r["input_bytes"], input.bytes.len(), "{r}");
            assert_eq!(r["output"], output.as_str(), "{r}");
            assert_eq!(r["backend"], "faulty-marker", "{r}");
            assert!(
                r["model"].as_str().is_some_and(|m| m.ends_with(".onnx")),
                "{r}"
            );
            assert!(
                r["timings"]["total_s"].as_f64().is_some_and(|t| t > 0.0),
                "{r}"
            );
            assert_eq!(
                fs::read(outbox.join("done").join(&filed)).unwrap(),
                input.bytes,
                "{name}: done/{filed} is not the input"
            );
            // The label map: complete, on the input's grid, and the
            // segmentation of this input (the backend's mask is
            // "above the volume's mean"), not of another.
            let vin = input.volume.as_ref().unwrap();
            let out = nifti_io::read_volume(&outbox.join(&output), &limits)
                .unwrap_or_else(|e| panic!("{output}: {e}"));
            assert_eq!(out.dims(), vin.dims(), "{output}");
            assert!((out.affine - vin.affine).abs().max() < 1e-4, "{output}");
            let mean = vin.data.iter().map(|&v| f64::from(v)).sum::<f64>() / vin.data.len() as f64;
            let mut agree = 0usize;
            for (l, v) in out.data.iter().zip(vin.data.iter()) {
                assert!(*l == 0.0 || *l == 1.0, "{output}: label {l}");
                if (*l == 1.0) == (f64::from(*v) > mean) {
                    agree += 1;
                }
            }
            let agreement = agree as f64 / out.data.len() as f64;
            // 2 mm inputs are segmented on their own grid: exact but for
            // ties; 4 mm ones go through resampling both ways.
            let need = if vin.spacing[0] > 3.0 { 0.85 } else { 0.99 };
            assert!(
                agreement >= need,
                "{output}: only {:.1}% of voxels agree with the input's mask",
                100.0 * agreement
            );
            worst_agreement = worst_agreement.min(agreement);
        } else {
            assert_eq!(got, ["failed"], "{name}: outcomes {got:?} {}", ctx());
            let err_name = format!("{filed}.error.json");
            want_failed.insert(filed.clone());
            want_failed.insert(err_name.clone());
            let e: Value = serde_json::from_str(
                &fs::read_to_string(outbox.join("failed").join(&err_name)).unwrap(),
            )
            .unwrap_or_else(|e| panic!("{err_name}: {e}"));
            assert_eq!(e["input"], name.as_str(), "{e}");
            assert_eq!(e["input_sha256"], shas[name].as_str(), "{e}");
            let error = e["error"].as_str().unwrap_or_default();
            assert!(!error.is_empty(), "{e}");
            if input.kind == Kind::Marker {
                assert!(error.contains("marker value"), "{name}: {error}");
            }
            if input.kind == Kind::TooLarge {
                assert!(error.contains("max_voxels"), "{name}: {error}");
            }
            if input.kind == Kind::Hang {
                assert_eq!(e["kind"], "timeout", "{name}: {e}");
                assert!(error.contains("timed out"), "{name}: {error}");
            }
            let failed = outbox.join("failed").join(&filed);
            if input.kind == Kind::Sparse {
                assert_eq!(e["kind"], "limit", "{name}: {e}");
                assert!(error.contains("max_input_bytes"), "{name}: {error}");
                assert_eq!(fs::metadata(&failed).unwrap().len(), SPARSE_LEN, "{name}");
            } else {
                assert_eq!(
                    fs::read(&failed).unwrap(),
                    input.bytes,
                    "{name}: failed/{filed} is not the input"
                );
            }
        }
    }
    // Exactly these files: no temporary, partial or duplicate one.
    assert_eq!(names(outbox), want_outbox, "outbox {}", ctx());
    assert_eq!(names(&outbox.join("done")), want_done, "done/ {}", ctx());
    assert_eq!(
        names(&outbox.join("failed")),
        want_failed,
        "failed/ {}",
        ctx()
    );
    let state: BTreeSet<String> = ["journal.jsonl", "lock", "status.json"]
        .map(str::to_owned)
        .into();
    assert_eq!(names(&outbox.join(".infl8")), state);
    // One outcome per input and no outcome for anything else.
    assert_eq!(outcomes.len(), inputs.len());
    // The read-only outbox was met (and waited out, as checked above).
    let deferred = records.iter().filter(|r| r["event"] == "deferred").count();
    assert!(deferred > 0, "no input met the read-only outbox {}", ctx());
    eprintln!(
        "soak: {} taken records for {} inputs; worst mask agreement {:.2}%",
        records.iter().filter(|r| r["event"] == "taken").count(),
        inputs.len(),
        100.0 * worst_agreement
    );
}
