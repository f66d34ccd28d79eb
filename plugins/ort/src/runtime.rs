//! Loading ONNX Runtime itself: which shared library, once per process, and
//! what it offers.
//!
//! The library is found in this order (the first that names or holds one
//! wins; see docs/ort.md):
//!
//! 1. the `library` load option (settings: `backend_options.ort.library`);
//! 2. the `ORT_DYLIB_PATH` environment variable;
//! 3. `onnxruntime/libonnxruntime.so` next to this plugin library (the
//!    plugin's own path comes from `dladdr`), where a package puts it;
//! 4. `$XDG_DATA_HOME/infl8/onnxruntime/libonnxruntime.so` (default
//!    `~/.local/share/infl8/onnxruntime/`), where `scripts/fetch-ort.sh`
//!    installs it;
//! 5. the system loader (`libonnxruntime.so`, then `libonnxruntime.so.1`).
//!
//! A library named by 1 or 2 must be there: nothing else is tried. A process
//! holds one ONNX Runtime: the first load decides, its failure is
//! remembered, and a later request for another library is an error rather
//! than a silent mix.

use std::ffi::{CStr, OsStr, c_char, c_int};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::environment::Environment;
use ort::logging::LogLevel;

/// The environment variable `ort` and this plugin read the library from.
pub const ENV_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// The file looked for in the `onnxruntime/` folders of the search.
const LIBRARY_FILE: &str = "libonnxruntime.so";

/// The folder, next to the plugin and in the data directory, that holds it.
pub const LIBRARY_DIR: &str = "onnxruntime";

/// Tried through the system loader when nothing else holds a library.
const DEFAULT_NAMES: &[&str] = &["libonnxruntime.so", "libonnxruntime.so.1"];

/// Where a candidate library comes from (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The `library` load option (settings: `backend_options.ort.library`).
    Option,
    /// `ORT_DYLIB_PATH`.
    Env,
    /// `onnxruntime/` next to the plugin library.
    NextToPlugin,
    /// The per-user data folder (`$XDG_DATA_HOME/infl8/onnxruntime/`).
    UserData,
    /// The system loader's search path.
    System,
}

impl Source {
    /// Named by the user: the library must be that one.
    fn explicit(self) -> bool {
        matches!(self, Source::Option | Source::Env)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Option => "the `library` load option",
            Source::Env => "ORT_DYLIB_PATH",
            Source::NextToPlugin => "the onnxruntime/ folder next to the plugin",
            Source::UserData => "the per-user data folder",
            Source::System => "the system loader",
        })
    }
}

/// One library to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub source: Source,
}

/// Which ONNX Runtime library to load: the candidates in order, and the
/// folders of the search that held none (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryRequest {
    pub candidates: Vec<Candidate>,
    pub searched: Vec<PathBuf>,
}

impl LibraryRequest {
    /// From the load option, else the environment variable's value `env`,
    /// else the first of the `onnxruntime/` folders `dirs` (in order) that
    /// holds the library, then the system loader.
    pub fn resolve(option: Option<&Path>, env: Option<&str>, dirs: &[(PathBuf, Source)]) -> Self {
        let named = |path: PathBuf, source| LibraryRequest {
            candidates: vec![Candidate { path, source }],
            searched: Vec::new(),
        };
        if let Some(p) = option {
            return named(p.to_path_buf(), Source::Option);
        }
        if let Some(p) = env.map(str::trim).filter(|s| !s.is_empty()) {
            return named(PathBuf::from(p), Source::Env);
        }
        let mut candidates = Vec::new();
        let mut searched = Vec::new();
        for (dir, source) in dirs {
            let lib = dir.join(LIBRARY_FILE);
            if lib.exists() {
                candidates.push(Candidate {
                    path: lib,
                    source: *source,
                });
            } else {
                searched.push(dir.clone());
            }
        }
        candidates.extend(DEFAULT_NAMES.iter().map(|n| Candidate {
            path: PathBuf::from(n),
            source: Source::System,
        }));
        LibraryRequest {
            candidates,
            searched,
        }
    }

    /// From the load option, the process environment and the folders of the
    /// search ([`search_dirs`]).
    pub fn from_env(option: Option<&Path>) -> Self {
        let env = std::env::var(ENV_DYLIB_PATH).ok();
        Self::resolve(option, env.as_deref(), &search_dirs())
    }

    /// The user named the library (option or environment variable).
    fn explicit(&self) -> bool {
        self.candidates.first().is_some_and(|c| c.source.explicit())
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .candidates
            .iter()
            .map(|c| format!("{} (from {})", c.path.display(), c.source))
            .collect();
        names.join(" or ")
    }
}

/// The `onnxruntime/` folders searched when neither the option nor
/// `ORT_DYLIB_PATH` names a library: next to this plugin, then the per-user
/// data folder.
pub fn search_dirs() -> Vec<(PathBuf, Source)> {
    let mut dirs = Vec::new();
    if let Some(dir) = plugin_dir() {
        dirs.push((dir.join(LIBRARY_DIR), Source::NextToPlugin));
    }
    let xdg = std::env::var_os("XDG_DATA_HOME");
    let home = std::env::var_os("HOME");
    if let Some(dir) = user_data_dir(xdg.as_deref(), home.as_deref()) {
        dirs.push((dir, Source::UserData));
    }
    dirs
}

/// `$XDG_DATA_HOME/infl8/onnxruntime`, else `$HOME/.local/share/...`. The
/// XDG spec ignores a relative `XDG_DATA_HOME`, and so does this.
pub fn user_data_dir(xdg_data_home: Option<&OsStr>, home: Option<&OsStr>) -> Option<PathBuf> {
    let base = xdg_data_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            home.map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".local/share"))
        })?;
    Some(base.join("infl8").join(LIBRARY_DIR))
}

/// The folder of the shared object this code is in (the plugin library;
/// the executable when linked in statically), from the loader (`dladdr`).
pub fn plugin_dir() -> Option<PathBuf> {
    let here: fn() -> Option<PathBuf> = plugin_dir;
    // SAFETY: `Dl_info` is plain data, valid when zeroed.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `here` is an address inside this object; `info` is writable.
    let found = unsafe { libc::dladdr(here as *const libc::c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: the loader's NUL-terminated name of a loaded object, which
    // stays loaded (plugins are never unloaded).
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let path = Path::new(OsStr::from_bytes(name.to_bytes()));
    // A library opened by a relative path is named relative to the working
    // directory of that moment: resolve it now.
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    path.parent().map(Path::to_path_buf)
}

/// Why ONNX Runtime could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// No library was there to load (nothing found, or a named path that
    /// does not exist): this machine lacks ONNX Runtime.
    #[error("{0}")]
    Missing(String),
    /// A library was found but cannot be used.
    #[error("{0}")]
    Unusable(String),
}

impl RuntimeError {
    fn new(missing: bool, message: String) -> Self {
        if missing {
            RuntimeError::Missing(message)
        } else {
            RuntimeError::Unusable(message)
        }
    }

    pub fn is_missing(&self) -> bool {
        matches!(self, RuntimeError::Missing(_))
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
    result: Result<Runtime, RuntimeError>,
}

static RUNTIME: OnceLock<Loaded> = OnceLock::new();

/// The process's ONNX Runtime, loading it on first use from `request`.
/// Errors are complete sentences naming the library and the problem.
pub fn runtime(request: &LibraryRequest) -> Result<&'static Runtime, RuntimeError> {
    let loaded = RUNTIME.get_or_init(|| Loaded {
        request: request.clone(),
        result: load(request),
    });
    match &loaded.result {
        Err(e) if loaded.request == *request => Err(e.clone()),
        Err(e) => Err(RuntimeError::new(
            e.is_missing(),
            format!(
                "{e} (ONNX Runtime is loaded once per process; this load asked for {})",
                request.describe()
            ),
        )),
        Ok(rt) => {
            // A searched-for library accepts whatever is loaded; an explicit
            // path must be the library in use.
            let wanted = &request.candidates[0];
            if request.explicit()
                && loaded.request != *request
                && !same_file(&rt.library, &wanted.path)
            {
                return Err(RuntimeError::Unusable(format!(
                    "ONNX Runtime is already loaded in this process from {} (from {}); {} \
                         asks for {}: one process holds one ONNX Runtime, give every ort backend \
                         the same library",
                    rt.library.display(),
                    rt.source,
                    wanted.source,
                    wanted.path.display()
                )));
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

fn load(request: &LibraryRequest) -> Result<Runtime, RuntimeError> {
    let mut failures = Vec::new();
    // Stays true while every candidate was simply not there.
    let mut missing = true;
    for candidate in &request.candidates {
        let path = &candidate.path;
        // An explicit path that does not exist gets a plain message rather
        // than the loader's.
        if candidate.source.explicit() && !path.exists() {
            failures.push(format!(
                "{} does not exist (named by {}); run scripts/fetch-ort.sh or point {} or the \
                 `library` option at an ONNX Runtime {}.{}+ libonnxruntime.so",
                path.display(),
                candidate.source,
                ENV_DYLIB_PATH,
                1,
                ort::MINOR_VERSION
            ));
            continue;
        }
        // `ort` may panic on an unusable library (a null API base); keep
        // that an error for this load.
        let attempt = catch_unwind(AssertUnwindSafe(|| init(path)));
        match attempt {
            Ok(Ok(rt)) => {
                return Ok(Runtime {
                    source: candidate.source,
                    ..rt
                });
            }
            Ok(Err(InitError::Library(e))) => {
                // The system loader found no such name: not there either.
                missing &=
                    candidate.source == Source::System && e.contains("No such file or directory");
                failures.push(e);
            }
            // The library is loaded into `ort` now: trying another is not
            // possible.
            Ok(Err(InitError::AfterLoad(e))) => {
                missing = false;
                failures.push(e);
                break;
            }
            Err(p) => {
                missing = false;
                failures.push(format!(
                    "loading ONNX Runtime from {} panicked: {}",
                    path.display(),
                    panic_text(p.as_ref())
                ));
                break;
            }
        }
    }
    let mut message = format!("cannot load ONNX Runtime: {}", failures.join("; "));
    if !request.explicit() {
        let searched: Vec<String> = request
            .searched
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        message.push_str(&format!(
            "; searched {} (none holds {LIBRARY_FILE}) and the system loader: run \
             scripts/fetch-ort.sh (installs into the per-user data folder), or set \
             {ENV_DYLIB_PATH} or the `library` option",
            searched.join(" and ")
        ));
    }
    Err(RuntimeError::new(missing, message))
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
        source: Source::System,
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

    fn paths(r: &LibraryRequest) -> Vec<(PathBuf, Source)> {
        r.candidates
            .iter()
            .map(|c| (c.path.clone(), c.source))
            .collect()
    }

    #[test]
    fn option_beats_env_beats_search() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("next-to-plugin");
        std::fs::create_dir_all(&full).unwrap();
        std::fs::write(full.join(LIBRARY_FILE), b"").unwrap();
        let dirs = [(full.clone(), Source::NextToPlugin)];

        let r = LibraryRequest::resolve(Some(Path::new("/a/libonnxruntime.so")), Some("/b"), &dirs);
        assert_eq!(
            paths(&r),
            [(PathBuf::from("/a/libonnxruntime.so"), Source::Option)]
        );

        let r = LibraryRequest::resolve(None, Some("/b/libonnxruntime.so"), &dirs);
        assert_eq!(
            paths(&r),
            [(PathBuf::from("/b/libonnxruntime.so"), Source::Env)]
        );

        for env in [None, Some(""), Some("  ")] {
            let r = LibraryRequest::resolve(None, env, &dirs);
            assert!(!r.explicit());
            assert_eq!(
                paths(&r)[0],
                (full.join(LIBRARY_FILE), Source::NextToPlugin)
            );
        }
    }

    #[test]
    fn the_search_takes_folders_in_order_and_skips_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("plugin/onnxruntime");
        let user = dir.path().join("data/infl8/onnxruntime");
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(&user).unwrap();
        std::fs::write(user.join(LIBRARY_FILE), b"").unwrap();
        let dirs = [
            (empty.clone(), Source::NextToPlugin),
            (user.clone(), Source::UserData),
        ];
        let r = LibraryRequest::resolve(None, None, &dirs);
        assert_eq!(
            paths(&r),
            [
                (user.join(LIBRARY_FILE), Source::UserData),
                (PathBuf::from("libonnxruntime.so"), Source::System),
                (PathBuf::from("libonnxruntime.so.1"), Source::System),
            ]
        );
        assert_eq!(r.searched, [empty]);
    }

    #[test]
    fn user_data_dir_follows_xdg() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(
            user_data_dir(os("/x/data"), os("/home/u")),
            Some(PathBuf::from("/x/data/infl8/onnxruntime"))
        );
        for xdg in [None, os(""), os("relative/data")] {
            assert_eq!(
                user_data_dir(xdg, os("/home/u")),
                Some(PathBuf::from("/home/u/.local/share/infl8/onnxruntime"))
            );
        }
        assert_eq!(user_data_dir(None, None), None);
    }

    #[test]
    fn plugin_dir_is_the_folder_of_this_object() {
        // Linked into the test executable here: its folder.
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert_eq!(plugin_dir().as_deref(), exe.parent());
    }

    #[test]
    fn a_path_that_does_not_exist_is_missing_and_named_without_loading() {
        let r =
            LibraryRequest::resolve(Some(Path::new("/nonexistent/libonnxruntime.so")), None, &[]);
        let e = load(&r).err().unwrap();
        assert!(e.is_missing(), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("/nonexistent/libonnxruntime.so does not exist")
                && e.contains("`library` load option")
                && e.contains("fetch-ort.sh"),
            "{e}"
        );
        let r = LibraryRequest::resolve(None, Some("/nonexistent/lib.so"), &[]);
        let e = load(&r).err().unwrap();
        assert!(
            e.is_missing() && e.to_string().contains("ORT_DYLIB_PATH"),
            "{e:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_library_is_broken_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join(LIBRARY_FILE);
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let r = LibraryRequest::resolve(Some(&fake), None, &[]);
        let e = load(&r).err().unwrap();
        assert!(!e.is_missing(), "{e:?}");
    }
}
