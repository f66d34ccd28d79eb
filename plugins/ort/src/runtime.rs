//! Loading ONNX Runtime itself: which shared library, once per process, and
//! what it offers.
//!
//! The library is found, in order, from the `library` load option, the
//! `ORT_DYLIB_PATH` environment variable, or the system loader
//! (`libonnxruntime.so`, then `libonnxruntime.so.1`; `ort` also looks next
//! to the executable for a bare name). A process holds one ONNX Runtime:
//! the first load decides, its failure is remembered, and a later request
//! for another library is an error rather than a silent mix.

use std::ffi::{CStr, c_char, c_int};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::environment::Environment;
use ort::logging::LogLevel;

/// The environment variable `ort` and this plugin read the library from.
pub const ENV_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// Tried through the system loader when nothing names a library.
const DEFAULT_NAMES: &[&str] = &["libonnxruntime.so", "libonnxruntime.so.1"];

/// Where the library request came from (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The `library` load option (settings: `backend_options.ort.library`).
    Option,
    /// `ORT_DYLIB_PATH`.
    Env,
    /// Nothing named one: the system loader's search path.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Option => "the `library` load option",
            Source::Env => "ORT_DYLIB_PATH",
            Source::Default => "the system loader (no `library` option, ORT_DYLIB_PATH unset)",
        })
    }
}

/// Which ONNX Runtime library to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryRequest {
    pub candidates: Vec<PathBuf>,
    pub source: Source,
}

impl LibraryRequest {
    /// From the load option, else the environment variable's value `env`.
    pub fn resolve(option: Option<&Path>, env: Option<&str>) -> Self {
        if let Some(p) = option {
            return LibraryRequest {
                candidates: vec![p.to_path_buf()],
                source: Source::Option,
            };
        }
        if let Some(p) = env.map(str::trim).filter(|s| !s.is_empty()) {
            return LibraryRequest {
                candidates: vec![PathBuf::from(p)],
                source: Source::Env,
            };
        }
        LibraryRequest {
            candidates: DEFAULT_NAMES.iter().map(PathBuf::from).collect(),
            source: Source::Default,
        }
    }

    /// From the load option and the process environment.
    pub fn from_env(option: Option<&Path>) -> Self {
        let env = std::env::var(ENV_DYLIB_PATH).ok();
        Self::resolve(option, env.as_deref())
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!("{} (from {})", names.join(" or "), self.source)
    }
}

/// ONNX Runtime, loaded and with its one environment.
pub struct Runtime {
    pub env: Environment,
    /// The library as it was asked for (a path, or a bare name the system
    /// loader resolved).
    pub library: PathBuf,
    pub source: Source,
    /// ONNX Runtime's version, e.g. `1.24.4`.
    pub version: String,
    /// Execution providers compiled into this ONNX Runtime.
    pub providers: Vec<String>,
}

impl Runtime {
    /// The folder holding the library, when it was named by a path.
    pub fn library_dir(&self) -> Option<&Path> {
        self.library
            .parent()
            .filter(|p| !p.as_os_str().is_empty() && self.library.is_absolute())
    }

    pub fn has_provider(&self, name: &str) -> bool {
        self.providers.iter().any(|p| p == name)
    }
}

struct Loaded {
    request: LibraryRequest,
    result: Result<Runtime, String>,
}

static RUNTIME: OnceLock<Loaded> = OnceLock::new();

/// The process's ONNX Runtime, loading it on first use from `request`.
/// Errors are complete sentences naming the library and the problem.
pub fn runtime(request: &LibraryRequest) -> Result<&'static Runtime, String> {
    let loaded = RUNTIME.get_or_init(|| Loaded {
        request: request.clone(),
        result: load(request),
    });
    match &loaded.result {
        Err(e) => Err(if loaded.request == *request {
            e.clone()
        } else {
            format!(
                "{e} (ONNX Runtime is loaded once per process; this load asked for {})",
                request.describe()
            )
        }),
        Ok(rt) => {
            // A bare default name accepts whatever is loaded; an explicit
            // path must be the library in use.
            if request.source != Source::Default
                && loaded.request != *request
                && !same_file(&rt.library, &request.candidates[0])
            {
                return Err(format!(
                    "ONNX Runtime is already loaded in this process from {} (from {}); {} asks \
                     for {}: one process holds one ONNX Runtime, give every ort backend the same \
                     library",
                    rt.library.display(),
                    rt.source,
                    request.source,
                    request.candidates[0].display()
                ));
            }
            Ok(rt)
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn load(request: &LibraryRequest) -> Result<Runtime, String> {
    let mut failures = Vec::new();
    for candidate in &request.candidates {
        // An explicit path that does not exist gets a plain message rather
        // than the loader's.
        if request.source != Source::Default && !candidate.exists() {
            failures.push(format!(
                "{} does not exist (named by {}); run scripts/fetch-ort.sh or point {} or the \
                 `library` option at an ONNX Runtime {}.{}+ libonnxruntime.so",
                candidate.display(),
                request.source,
                ENV_DYLIB_PATH,
                1,
                ort::MINOR_VERSION
            ));
            continue;
        }
        // `ort` may panic on an unusable library (a null API base); keep
        // that an error for this load.
        let attempt = catch_unwind(AssertUnwindSafe(|| init(candidate)));
        match attempt {
            Ok(Ok(rt)) => {
                return Ok(Runtime {
                    source: request.source,
                    ..rt
                });
            }
            Ok(Err(InitError::Library(e))) => failures.push(e),
            // The library is loaded into `ort` now: trying another is not
            // possible.
            Ok(Err(InitError::AfterLoad(e))) => {
                failures.push(e);
                break;
            }
            Err(p) => {
                failures.push(format!(
                    "loading ONNX Runtime from {} panicked: {}",
                    candidate.display(),
                    panic_text(p.as_ref())
                ));
                break;
            }
        }
    }
    let mut msg = format!("cannot load ONNX Runtime: {}", failures.join("; "));
    if request.source == Source::Default {
        msg.push_str(&format!(
            "; set {ENV_DYLIB_PATH} or the `library` option (scripts/fetch-ort.sh fetches one into \
             .cache/onnxruntime/cpu/)"
        ));
    }
    Err(msg)
}

enum InitError {
    /// The library did not load: another candidate may.
    Library(String),
    /// The library loaded but ONNX Runtime could not start.
    AfterLoad(String),
}

fn init(path: &Path) -> Result<Runtime, InitError> {
    let builder = ort::init_from(path).map_err(|e| InitError::Library(load_dynamic_error(&e)))?;
    let env = builder
        .with_name("infl8")
        .with_telemetry(false)
        .with_logger(Arc::new(log_to_tracing))
        .build()
        .map_err(|e| {
            InitError::AfterLoad(format!(
                "ONNX Runtime from {} loaded but cannot create its environment: {e}",
                path.display()
            ))
        })?;
    let version = version_string(path).unwrap_or_else(|| "unknown version".into());
    let providers = available_providers().map_err(|e| {
        InitError::AfterLoad(format!(
            "ONNX Runtime {version} from {} cannot list its execution providers: {e}",
            path.display()
        ))
    })?;
    tracing::debug!(
        library = %path.display(),
        version = %version,
        build = %ort::info(),
        providers = ?providers,
        "ONNX Runtime loaded"
    );
    Ok(Runtime {
        env,
        library: path.to_path_buf(),
        source: Source::Default,
        version,
        providers,
    })
}

/// `ort`'s load error, with the loader's own message (which `libloading`
/// keeps in the error's source).
fn load_dynamic_error(e: &ort::LoadDynamicError) -> String {
    match e {
        ort::LoadDynamicError::Dlopen { error, path } => {
            let why = dl_error(error);
            // The loader's message usually starts with the path already.
            if why.starts_with(&path.display().to_string()) {
                why
            } else {
                format!("{}: {why}", path.display())
            }
        }
        other => other.to_string(),
    }
}

/// A `libloading` error with its cause (`dlopen failed` alone says little).
pub fn dl_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => cause.to_string(),
        None => e.to_string(),
    }
}

/// The loaded library's version (`OrtGetApiBase()->GetVersionString()`).
fn version_string(path: &Path) -> Option<String> {
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: `ort` loaded this library already, so this only takes another
    // reference to it (kept: the library stays loaded for the process).
    let lib = unsafe { libloading::Library::new(path) }.ok()?;
    // SAFETY: the symbol has this signature in every ONNX Runtime.
    let text = unsafe {
        let get: libloading::Symbol<'_, GetApiBase> = lib.get(b"OrtGetApiBase").ok()?;
        let base = get();
        if base.is_null() {
            return None;
        }
        let v = ((*base).GetVersionString)();
        if v.is_null() {
            return None;
        }
        CStr::from_ptr(v).to_string_lossy().into_owned()
    };
    std::mem::forget(lib);
    Some(text)
}

/// ONNX Runtime's log records, as `tracing` events (target `onnxruntime`).
/// Its INFO level narrates graph optimisation: that goes to DEBUG.
fn log_to_tracing(level: LogLevel, category: &str, _id: &str, location: &str, message: &str) {
    match level {
        LogLevel::Verbose => {
            tracing::trace!(target: "onnxruntime", category, location, "{message}")
        }
        LogLevel::Info => tracing::debug!(target: "onnxruntime", category, "{message}"),
        LogLevel::Warning => tracing::warn!(target: "onnxruntime", "{message}"),
        LogLevel::Error | LogLevel::Fatal => tracing::error!(target: "onnxruntime", "{message}"),
    }
}

/// The level ONNX Runtime sessions should log at, from what the host records.
pub fn session_log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Verbose,
        LevelFilter::DEBUG => LogLevel::Info,
        LevelFilter::INFO | LevelFilter::WARN => LogLevel::Warning,
        _ => LogLevel::Error,
    }
}

/// The execution providers compiled into the loaded ONNX Runtime
/// (`GetAvailableProviders`). Call only once the library is loaded.
fn available_providers() -> Result<Vec<String>, String> {
    let api = ort::api();
    let mut list: *mut *mut c_char = std::ptr::null_mut();
    let mut count: c_int = 0;
    // SAFETY: the API table comes from the loaded library; both out
    // pointers are valid for writes.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut count) };
    status_result(api, status)?;
    let mut names = Vec::new();
    if !list.is_null() {
        for i in 0..usize::try_from(count).unwrap_or(0) {
            // SAFETY: ONNX Runtime returned `count` NUL-terminated strings.
            let p = unsafe { *list.add(i) };
            if !p.is_null() {
                // SAFETY: non-null, NUL-terminated (above).
                names.push(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
            }
        }
        // SAFETY: releases exactly what GetAvailableProviders returned.
        let status = unsafe { (api.ReleaseAvailableProviders)(list, count) };
        status_result(api, status)?;
    }
    Ok(names)
}

fn status_result(api: &ort::sys::OrtApi, status: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status from the same API; read, then released once.
    unsafe {
        let msg = (api.GetErrorMessage)(status.0);
        let text = if msg.is_null() {
            "unknown error".to_owned()
        } else {
            CStr::from_ptr(msg).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(status.0);
        Err(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_beats_env_beats_default() {
        let r = LibraryRequest::resolve(Some(Path::new("/a/libonnxruntime.so")), Some("/b"));
        assert_eq!(r.candidates, [PathBuf::from("/a/libonnxruntime.so")]);
        assert_eq!(r.source, Source::Option);

        let r = LibraryRequest::resolve(None, Some("/b/libonnxruntime.so"));
        assert_eq!(r.candidates, [PathBuf::from("/b/libonnxruntime.so")]);
        assert_eq!(r.source, Source::Env);

        for env in [None, Some(""), Some("  ")] {
            let r = LibraryRequest::resolve(None, env);
            assert_eq!(r.source, Source::Default);
            assert_eq!(
                r.candidates,
                [
                    PathBuf::from("libonnxruntime.so"),
                    PathBuf::from("libonnxruntime.so.1")
                ]
            );
        }
    }

    #[test]
    fn a_path_that_does_not_exist_is_named_without_loading() {
        let r = LibraryRequest::resolve(Some(Path::new("/nonexistent/libonnxruntime.so")), None);
        let e = load(&r).err().unwrap();
        assert!(
            e.contains("/nonexistent/libonnxruntime.so does not exist")
                && e.contains("`library` load option")
                && e.contains("fetch-ort.sh"),
            "{e}"
        );
        let r = LibraryRequest::resolve(None, Some("/nonexistent/lib.so"));
        let e = load(&r).err().unwrap();
        assert!(e.contains("ORT_DYLIB_PATH"), "{e}");
    }
}
