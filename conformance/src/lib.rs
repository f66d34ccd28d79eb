//! The conformance kit behind `infl8 plugin check`: calls a plugin library
//! through the raw C ABI and checks what every backend plugin must do —
//! versions and struct sizes, metadata, a reference model's numbers against
//! the kit's own evaluator ([`reference`]) at batch 1 and N, refusals (bad
//! model file, wrong input shape, invalid arguments), the error-buffer
//! contract and concurrent runs.
//!
//! A backend whose `model_load` answers `INFL8_UNAVAILABLE` (it cannot run
//! on this machine: no GPU, no runtime library) is skipped with that reason,
//! or failed when [`Options::require_all`] is set.
//!
//! [`run`] executes the checks in this process and reports each one through
//! a callback as it starts and ends. A plugin can crash its host, so the
//! `infl8` command runs them in a child process and resumes after a crash
//! with [`Options::start`]: every check is self-contained for that reason
//! (it loads what it needs), except the few setup steps that every later
//! check needs, which run again (silently) in a resumed child.

mod backend_checks;
pub mod raw;
pub mod reference;

use std::path::PathBuf;

use infl8_core::backend::LoadOptions;
use infl8_core::config;
use infl8_core::plugin::abi::*;
use serde::{Deserialize, Serialize};

use backend_checks::{BackendUnderTest, Context};
use raw::Library;

/// Window of the reference model; small so the kit runs in seconds.
pub const REFERENCE_ROI: [usize; 3] = [16, 16, 16];

/// What to check, and how.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// The plugin library under test.
    pub library: PathBuf,
    /// Backends to check; empty = all the library declares. Others are
    /// reported as skipped.
    pub backends: Vec<String>,
    /// Fail, rather than skip, a backend that cannot run on this machine.
    pub require_all: bool,
    /// Largest accepted |difference| from the reference output.
    pub tolerance: f32,
    /// Batch size of the batch-N run (at least 2).
    pub batch: usize,
    /// Threads of the concurrency check.
    pub threads: usize,
    /// Settings file whose backend options (and plugin dirs) are used.
    pub config: Option<PathBuf>,
    /// Index of the first check to run (earlier ones were reported by a
    /// previous process).
    pub start: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            library: PathBuf::new(),
            backends: Vec::new(),
            require_all: false,
            tolerance: 1e-4,
            batch: 3,
            threads: 4,
            config: None,
            start: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// One check's verdict.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckResult {
    pub index: usize,
    pub name: String,
    /// `None` for library-wide checks.
    pub backend: Option<String>,
    pub outcome: Outcome,
    pub detail: String,
}

/// What [`run`] reports, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// A check begins (a crash before its result blames it).
    Start {
        index: usize,
        name: String,
        backend: Option<String>,
    },
    Result(CheckResult),
    /// Every check has been reported.
    Done,
}

type Verdict = Result<String, String>;

struct Runner<'a> {
    next: usize,
    start: usize,
    emit: &'a mut dyn FnMut(Event),
}

impl Runner<'_> {
    fn report(&mut self, index: usize, name: &str, backend: Option<&str>, v: &Verdict) {
        let (outcome, detail) = match v {
            Ok(d) => (Outcome::Pass, d.clone()),
            Err(d) => (Outcome::Fail, d.clone()),
        };
        (self.emit)(Event::Result(CheckResult {
            index,
            name: name.into(),
            backend: backend.map(str::to_owned),
            outcome,
            detail,
        }));
    }

    fn started(&mut self, index: usize, name: &str, backend: Option<&str>) {
        (self.emit)(Event::Start {
            index,
            name: name.into(),
            backend: backend.map(str::to_owned),
        });
    }

    /// A check later ones depend on: runs in every process, reported once.
    fn setup<T>(
        &mut self,
        name: &str,
        backend: Option<&str>,
        f: impl FnOnce() -> Result<(T, String), String>,
    ) -> Option<T> {
        let index = self.next;
        self.next += 1;
        let visible = index >= self.start;
        if visible {
            self.started(index, name, backend);
        }
        let r = f();
        let verdict = r.as_ref().map(|(_, d)| d.clone()).map_err(Clone::clone);
        if visible {
            self.report(index, name, backend, &verdict);
        }
        r.ok().map(|(t, _)| t)
    }

    /// A self-contained check: skipped entirely when a previous process
    /// already reported it.
    fn check(&mut self, name: &str, backend: Option<&str>, f: impl FnOnce() -> Verdict) {
        let index = self.next;
        self.next += 1;
        if index < self.start {
            return;
        }
        self.started(index, name, backend);
        let v = f();
        self.report(index, name, backend, &v);
    }

    /// Reports a group of checks with one verdict, in one row (the row's
    /// index is the group's first: a resumed process skips the group whole).
    fn group(&mut self, names: &[&str], backend: Option<&str>, outcome: Outcome, why: &str) {
        let index = self.next;
        self.next += names.len();
        if index < self.start {
            return;
        }
        (self.emit)(Event::Result(CheckResult {
            index,
            name: format!("all {} backend checks", names.len()),
            backend: backend.map(str::to_owned),
            outcome,
            detail: why.into(),
        }));
    }
}

/// The checks each backend goes through, in order.
pub const BACKEND_CHECKS: &[&str] = &[
    "load reference model",
    "model io",
    "run batch 1 vs reference",
    "run batch N vs reference",
    "batch items independent",
    "missing model file refused",
    "corrupt model file refused",
    "wrong input shape refused",
    "invalid arguments refused",
    "error buffer contract",
    "concurrent runs",
];

/// Runs the checks, reporting each through `emit`, ending with
/// [`Event::Done`] (unless the plugin takes the process down first).
pub fn run(opts: &Options, emit: &mut dyn FnMut(Event)) {
    let mut r = Runner {
        next: 0,
        start: opts.start,
        emit,
    };
    run_all(opts, &mut r);
    (r.emit)(Event::Done);
}

fn run_all(opts: &Options, r: &mut Runner<'_>) {
    let lib_path = opts.library.clone();
    let Some(entry) = r.setup("library opens", None, || {
        Library::open(&lib_path).map(|e| (e, format!("{}", lib_path.display())))
    }) else {
        return;
    };
    let Some(lib) = r.setup("entry accepts the host ABI", None, || check_entry(entry)) else {
        return;
    };
    let Some(()) = r.setup("table size and functions", None, || check_table(&lib)) else {
        return;
    };
    let Some(backends) = r.setup("metadata", None, || check_metadata(&lib)) else {
        return;
    };
    r.check("entry is idempotent", None, || check_idempotent(&lib));
    r.check("refuses another ABI major", None, || {
        check_abi_mismatch(&lib)
    });
    r.check("entry refuses a null table pointer", None, || {
        // SAFETY: the ABI's entry signature; a null out pointer must be refused.
        let code = unsafe { (lib.entry)(INFL8_ABI_VERSION, raw::host_api(), std::ptr::null_mut()) };
        expect_codes(code, &[INFL8_INVALID_ARGUMENT], "entry(out_table = NULL)")
    });

    let settings = config::load(opts.config.as_deref(), None, &serde_json::json!({}));
    let dir = tempfile::Builder::new()
        .prefix("infl8-plugin-check")
        .tempdir();
    let ctx = match (settings, dir) {
        (Ok(settings), Ok(dir)) => Context::new(opts, settings, dir),
        (Err(e), _) => Err(format!("settings: {e}")),
        (_, Err(e)) => Err(format!("cannot make a temporary folder: {e}")),
    };

    for (index, name) in backends.iter().enumerate() {
        let b = Some(name.as_str());
        if !opts.backends.is_empty() && !opts.backends.contains(name) {
            r.group(BACKEND_CHECKS, b, Outcome::Skip, "not selected (--backend)");
            continue;
        }
        let ctx = match &ctx {
            Ok(c) => c,
            Err(e) => {
                for check in BACKEND_CHECKS {
                    r.check(check, b, || Err(e.clone()));
                }
                continue;
            }
        };
        let bk = BackendUnderTest {
            table: lib.table(),
            index: index as u32,
            name,
            options: options_json(&ctx.settings.load_options(name)),
            ctx,
        };
        bk.run(r, opts.require_all);
    }
}

fn options_json(o: &LoadOptions) -> String {
    serde_json::to_string(o).unwrap_or_else(|_| "{}".into())
}

fn expect_codes(code: i32, want: &[i32], call: &str) -> Verdict {
    if want.contains(&code) {
        Ok(format!("{call} -> {}", status_name(code)))
    } else {
        let names: Vec<&str> = want.iter().map(|&c| status_name(c)).collect();
        Err(format!(
            "{call} returned {} ({code}); expected {}",
            status_name(code),
            names.join(" or ")
        ))
    }
}

fn check_entry(entry: Infl8PluginEntryFn) -> Result<(Library, String), String> {
    let lib = Library::call_entry(entry, INFL8_ABI_VERSION);
    if lib.table.is_null() {
        return Err(format!(
            "the entry returned {} and no table",
            status_name(lib.entry_status)
        ));
    }
    // SAFETY: the frozen header exists in every ABI major.
    let header = unsafe { lib.table.cast::<Infl8PluginHeader>().read() };
    let plugin_abi = version_string(header.abi_version);
    if lib.entry_status != INFL8_OK {
        return Err(format!(
            "the entry returned {} for host ABI {} (plugin ABI {plugin_abi})",
            status_name(lib.entry_status),
            version_string(INFL8_ABI_VERSION)
        ));
    }
    if abi_major(header.abi_version) != INFL8_ABI_MAJOR {
        return Err(format!(
            "the plugin speaks ABI {plugin_abi}; this kit checks ABI {}.x",
            INFL8_ABI_MAJOR
        ));
    }
    let detail = format!(
        "plugin ABI {plugin_abi}, host ABI {}",
        version_string(INFL8_ABI_VERSION)
    );
    Ok((lib, detail))
}

fn check_table(lib: &Library) -> Result<((), String), String> {
    // SAFETY: the header fields exist in every table.
    let size = unsafe { lib.table.cast::<Infl8PluginHeader>().read() }.struct_size;
    if size < Infl8PluginTable::MIN_SIZE {
        return Err(format!(
            "struct_size is {size}, ABI 1.0 tables are at least {} bytes",
            Infl8PluginTable::MIN_SIZE
        ));
    }
    let t = lib.table();
    let mut missing = Vec::new();
    for (name, present) in [
        ("model_load", t.model_load.is_some()),
        ("model_free", t.model_free.is_some()),
        ("model_io", t.model_io.is_some()),
        ("model_run", t.model_run.is_some()),
        ("tensor_free", t.tensor_free.is_some()),
    ] {
        if !present {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(format!("null function pointers: {}", missing.join(", ")));
    }
    let desc = size_of::<Infl8BackendDesc>() as u32;
    if t.backend_desc_size < desc {
        return Err(format!(
            "backend_desc_size is {}, ABI 1.0 descriptors are {desc} bytes",
            t.backend_desc_size
        ));
    }
    if t.backend_count > 0 && t.backends.is_null() {
        return Err(format!(
            "backend_count is {} but backends is null",
            t.backend_count
        ));
    }
    Ok((
        (),
        format!(
            "table {size} bytes (ABI 1.0: {}), descriptors {} bytes, 5 functions",
            Infl8PluginTable::MIN_SIZE,
            t.backend_desc_size
        ),
    ))
}

/// Most backends one library may declare (as the host).
const MAX_BACKENDS: u32 = 64;

fn check_metadata(lib: &Library) -> Result<(Vec<String>, String), String> {
    let t = lib.table();
    let plugin = raw::plugin_str(t.plugin_name).map_err(|e| format!("plugin_name: {e}"))?;
    let version = raw::plugin_str(t.plugin_version).map_err(|e| format!("plugin_version: {e}"))?;
    if plugin.trim().is_empty() || version.trim().is_empty() {
        return Err(format!(
            "plugin name `{plugin}` and version `{version}` must not be empty"
        ));
    }
    if t.backend_count == 0 || t.backend_count > MAX_BACKENDS {
        return Err(format!(
            "backend_count is {}; a plugin declares 1..={MAX_BACKENDS} backends",
            t.backend_count
        ));
    }
    let mut names: Vec<String> = Vec::new();
    for (i, d) in raw::backends(t).iter().enumerate() {
        let name = raw::plugin_str(d.name).map_err(|e| format!("backend {i} name: {e}"))?;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(format!(
                "backend {i} name `{name}`: use letters, digits, `-`, `_`, `.`"
            ));
        }
        if names.contains(&name) {
            return Err(format!("backend name `{name}` appears twice"));
        }
        if !d.description.is_null() {
            raw::plugin_str(d.description)
                .map_err(|e| format!("backend `{name}` description: {e}"))?;
        }
        names.push(name);
    }
    let detail = format!("plugin {plugin} {version}, backends {}", names.join(", "));
    Ok((names, detail))
}

fn check_idempotent(lib: &Library) -> Verdict {
    let again = Library::call_entry(lib.entry, INFL8_ABI_VERSION);
    let entry = lib.entry;
    let other = std::thread::spawn(move || {
        let l = Library::call_entry(entry, INFL8_ABI_VERSION);
        (l.entry_status, l.table as usize)
    })
    .join()
    .map_err(|_| "the entry panicked on another thread".to_string())?;
    let first = lib.table as usize;
    if again.entry_status != INFL8_OK || other.0 != INFL8_OK {
        return Err(format!(
            "a second call returned {} / {} (other thread)",
            status_name(again.entry_status),
            status_name(other.0)
        ));
    }
    if again.table as usize != first || other.1 != first {
        return Err("the entry returned a different table on a second call".into());
    }
    Ok("same table from a second call and from another thread".into())
}

fn check_abi_mismatch(lib: &Library) -> Verdict {
    let future = abi_version(INFL8_ABI_MAJOR + 1, 0);
    let l = Library::call_entry(lib.entry, future);
    if l.entry_status != INFL8_ABI_MISMATCH {
        return Err(format!(
            "entry(host ABI {}) returned {}; expected ABI_MISMATCH",
            version_string(future),
            status_name(l.entry_status)
        ));
    }
    let mut detail = format!("host ABI {} -> ABI_MISMATCH", version_string(future));
    if !l.table.is_null() {
        // SAFETY: the frozen header of a table of any major.
        let h = unsafe { l.table.cast::<Infl8PluginHeader>().read() };
        let name = raw::plugin_str(h.plugin_name).map_err(|e| format!("plugin_name: {e}"))?;
        detail.push_str(&format!(
            ", table header names {name} (ABI {})",
            version_string(h.abi_version)
        ));
    }
    // The refusal must not poison the plugin for a matching host.
    let back = Library::call_entry(lib.entry, INFL8_ABI_VERSION);
    if back.entry_status != INFL8_OK || back.table != lib.table {
        return Err("after refusing ABI 2, the entry no longer serves ABI 1".into());
    }
    Ok(detail)
}
