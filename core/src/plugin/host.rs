//! The host side of the ABI: finding plugin libraries, loading them, checking
//! their version and wrapping their tables as [`Backend`]s.
//!
//! Plugins are trusted code: a library runs with the host's privileges and
//! can break memory safety however carefully the host checks what it
//! returns. Only point the host at directories you control. Before a
//! library is opened (which runs its constructors) the host refuses one
//! that others could have written (group- or world-writable, it or its
//! directory) unless told otherwise, and one that is not an ELF shared
//! library of this machine exporting the entry symbol; and it opens only the
//! libraries the requested backends need ([`PluginHost::discover_for`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr, OsString, c_char};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Arc;

use libloading::Library;

use super::abi::*;
use super::adapter::{PluginBackend, PluginFns};
use super::host_api::host_api;
use super::raw::lossy;
use crate::backend::Backend;

/// More backends than this in one library is a corrupt table, not a plugin.
const MAX_BACKENDS: u32 = 1024;

// `check_table` copies no more of a plugin's table than its `struct_size`,
// into a zeroed `Infl8PluginTable`: a field past an older plugin's table
// reads as null.
const _: () = assert!(size_of::<Infl8PluginTable>() >= Infl8PluginTable::MIN_SIZE as usize);

/// Why a plugin library, or a backend from one, is not available.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin library {} does not exist", .library.display())]
    NotFound { library: PathBuf },

    #[error("cannot open plugin library {}: {message}", .library.display())]
    Open { library: PathBuf, message: String },

    #[error(
        "refusing plugin library {}: {what} {} is {} (mode {mode:04o}), so others could \
         replace the code infl8 runs; remove the write permission (chmod go-w), or allow it \
         with plugins.allow_insecure_permissions = true (--allow-insecure-plugins)",
        .library.display(),
        .path.display(),
        writable_by(*.mode)
    )]
    InsecurePermissions {
        library: PathBuf,
        /// `the file` or `the directory`.
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },

    #[error(
        "{} is not an infl8 plugin: it does not export `{}` ({message})",
        .library.display(),
        INFL8_ENTRY_SYMBOL
    )]
    NoEntry { library: PathBuf, message: String },

    #[error(
        "plugin library {} ({plugin} {version}) speaks plugin ABI {plugin_abi}, this host \
         speaks ABI {host_abi}; major versions must match: rebuild the plugin against a \
         matching infl8-backend",
        .library.display()
    )]
    AbiMismatch {
        library: PathBuf,
        plugin: String,
        version: String,
        plugin_abi: String,
        host_abi: String,
    },

    #[error(
        "plugin library {}: its entry failed with status {} ({status}){}",
        .library.display(),
        status_name(*.status),
        if *.status == INFL8_PANIC { "; the log holds the panic message" } else { "" }
    )]
    EntryFailed { library: PathBuf, status: i32 },

    #[error("plugin library {} has an invalid table: {reason}", .library.display())]
    InvalidTable { library: PathBuf, reason: String },

    #[error(
        "no backend named `{name}`; available: {}; plugin directories searched: {}",
        list_or_none(.available),
        list_or_none(&.searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>())
    )]
    UnknownBackend {
        name: String,
        /// `name (library path)` of every backend the host knows.
        available: Vec<String>,
        searched: Vec<PathBuf>,
    },
}

fn writable_by(mode: u32) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "group- and world-writable",
        (false, true) => "world-writable",
        _ => "group-writable",
    }
}

/// The loader's own reason (`dlerror()`): libloading's message is only
/// "dlopen failed", the reason is its source.
fn loader_reason(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => e.to_string(),
    }
}

/// Refuses `library` when it, the file it resolves to, or the directory of
/// either is writable by group or others.
#[cfg(unix)]
fn check_permissions(library: &Path, canonical: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::PermissionsExt;
    let dirs = [library.parent(), canonical.parent()];
    let checks = [("the file", Some(canonical))]
        .into_iter()
        .chain(dirs.into_iter().map(|d| ("the directory", d)));
    for (what, path) in checks {
        let Some(path) = path.map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        }) else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(PluginError::InsecurePermissions {
                library: library.to_path_buf(),
                what,
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_: &Path, _: &Path) -> Result<(), PluginError> {
    Ok(())
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

/// What loading one library yielded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSummary {
    pub library: PathBuf,
    pub plugin: String,
    pub version: String,
    /// The plugin's ABI version, `major.minor`.
    pub abi: String,
    /// Backends registered from this library.
    pub backends: Vec<String>,
    /// Backends this library declares whose names an earlier library already
    /// took (search order decides, like `PATH`).
    pub shadowed: Vec<String>,
}

/// One backend the host can hand out, and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    pub name: String,
    pub description: String,
    pub plugin: String,
    pub version: String,
    pub library: PathBuf,
}

struct LoadedLibrary {
    canonical: PathBuf,
    /// Address of the plugin's table: the identity of the loaded image, which
    /// catches one file reached through two paths (hard links, copies the
    /// loader deduplicates).
    table: usize,
    summary: PluginSummary,
}

struct RegisteredBackend {
    info: BackendInfo,
    backend: Arc<PluginBackend>,
}

/// Loads plugin libraries and hands out their backends.
///
/// Libraries are searched in the configured directories, in order, then in
/// the directory of the running executable. Loaded libraries are never
/// unloaded: Rust code (thread-locals, registered destructors, threads a
/// plugin spawned) is not safe to `dlclose`.
///
/// The host captures the current `tracing` dispatcher when it loads a
/// library, so set up logging before loading plugins.
pub struct PluginHost {
    search_dirs: Vec<PathBuf>,
    libraries: Vec<LoadedLibrary>,
    backends: Vec<RegisteredBackend>,
    allow_insecure_permissions: bool,
}

impl PluginHost {
    /// A host searching `dirs`, then the running executable's directory.
    /// Loads nothing yet: see [`PluginHost::discover`].
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf));
        let mut search_dirs: Vec<PathBuf> = Vec::new();
        for dir in dirs.into_iter().chain(exe_dir) {
            if !search_dirs.contains(&dir) {
                search_dirs.push(dir);
            }
        }
        PluginHost {
            search_dirs,
            libraries: Vec::new(),
            backends: Vec::new(),
            allow_insecure_permissions: false,
        }
    }

    /// Also open libraries that are group- or world-writable or sit in such
    /// a directory (the setting `plugins.allow_insecure_permissions`).
    pub fn allow_insecure_permissions(mut self, allow: bool) -> Self {
        self.allow_insecure_permissions = allow;
        self
    }

    /// Library file names that may hold backend `name`, most specific
    /// first: `libinfl8_ort_cuda.so`, then the family `libinfl8_ort.so`
    /// (plugins name their backends after themselves: `ort-cpu` comes from
    /// `libinfl8_ort.so`).
    pub fn library_names_for(name: &str) -> Vec<String> {
        let file = |stem: &str| {
            format!(
                "{}infl8_{}{}",
                std::env::consts::DLL_PREFIX,
                stem.replace('-', "_"),
                std::env::consts::DLL_SUFFIX
            )
        };
        let mut names = vec![file(name)];
        if let Some((family, _)) = name.split_once('-') {
            names.push(file(family));
        }
        names
    }

    /// Loads only the libraries `backends` need, found by file name (see
    /// [`PluginHost::library_names_for`]); only if a backend is still
    /// missing after that does it fall back to [`PluginHost::discover`],
    /// opening every library. Returns what was tried, like `discover`.
    pub fn discover_for(
        &mut self,
        backends: &[String],
    ) -> Vec<(PathBuf, Result<PluginSummary, PluginError>)> {
        let mut found: Vec<(PathBuf, Result<PluginSummary, PluginError>)> = Vec::new();
        let has = |host: &Self, name: &str| host.backends.iter().any(|b| b.info.name == name);
        for name in backends {
            for file in Self::library_names_for(name) {
                if has(self, name) {
                    break;
                }
                // As with `PATH`, the first directory holding the name wins.
                let Some(path) = self
                    .search_dirs
                    .iter()
                    .map(|d| d.join(&file))
                    .find(|p| p.is_file())
                else {
                    continue;
                };
                if found.iter().any(|(p, _)| *p == path) {
                    continue;
                }
                let result = self.load_library(&path);
                found.push((path, result));
            }
        }
        if backends.iter().any(|name| !has(self, name)) {
            tracing::debug!(
                ?backends,
                "a backend is not in a library named after it: opening every plugin library"
            );
            for (path, result) in self.discover() {
                if !found.iter().any(|(p, _)| *p == path) {
                    found.push((path, result));
                }
            }
        }
        found
    }

    /// Where [`PluginHost::discover`] looks, in order.
    pub fn search_dirs(&self) -> &[PathBuf] {
        &self.search_dirs
    }

    /// Does `path` look like a plugin library (`libinfl8_*.so` and the
    /// platform's equivalents)?
    pub fn is_plugin_file_name(path: &Path) -> bool {
        let prefix = format!("{}infl8_", std::env::consts::DLL_PREFIX);
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(std::env::consts::DLL_SUFFIX))
    }

    /// Loads every plugin library in the search directories. A broken
    /// library is reported in its entry, not fatal; missing directories are
    /// skipped. As with `PATH`, the first directory holding a given file name
    /// wins: a later file of the same name is neither loaded nor reported.
    /// Libraries already loaded are reported again, not reloaded.
    pub fn discover(&mut self) -> Vec<(PathBuf, Result<PluginSummary, PluginError>)> {
        let mut found = Vec::new();
        let mut reported: HashSet<PathBuf> = HashSet::new();
        let mut names: HashMap<OsString, PathBuf> = self
            .libraries
            .iter()
            .filter_map(|l| {
                let name = l.summary.library.file_name()?;
                Some((name.to_os_string(), l.summary.library.clone()))
            })
            .collect();
        for dir in self.search_dirs.clone() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), "skipping plugin directory: {e}");
                    continue;
                }
            };
            let mut paths: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| Self::is_plugin_file_name(p) && p.is_file())
                .collect();
            paths.sort();
            for path in paths {
                let Some(name) = path.file_name().map(OsStr::to_os_string) else {
                    continue;
                };
                if let Some(first) = names.get(&name)
                    && *first != path
                    && !self.is_loaded(&path)
                {
                    tracing::debug!(
                        "skipping {}: shadowed by {}",
                        path.display(),
                        first.display()
                    );
                    continue;
                }
                let result = self.load_library(&path);
                match &result {
                    Ok(summary) => {
                        names.entry(name).or_insert_with(|| summary.library.clone());
                        if !reported.insert(summary.library.clone()) {
                            continue;
                        }
                    }
                    Err(e) => tracing::debug!("{e}"),
                }
                found.push((path, result));
            }
        }
        found
    }

    fn is_loaded(&self, path: &Path) -> bool {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        self.libraries.iter().any(|l| l.canonical == canonical)
    }

    /// Loads one library, whatever its name, and registers its backends.
    /// Loading an already loaded library returns its summary again.
    pub fn load_library(&mut self, path: impl AsRef<Path>) -> Result<PluginSummary, PluginError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(PluginError::NotFound {
                library: path.to_path_buf(),
            });
        }
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(lib) = self.libraries.iter().find(|l| l.canonical == canonical) {
            return Ok(lib.summary.clone());
        }
        if !self.allow_insecure_permissions {
            check_permissions(path, &canonical)?;
        }
        // Opening a library runs its constructors: anything that cannot be
        // a plugin for this build is refused from its headers first.
        #[cfg(target_os = "linux")]
        match super::elf::check(&canonical, INFL8_ENTRY_SYMBOL) {
            Ok(()) => {}
            Err(super::elf::ElfRefusal::NotLoadable(message)) => {
                return Err(PluginError::Open {
                    library: path.to_path_buf(),
                    message,
                });
            }
            Err(super::elf::ElfRefusal::NoEntry) => {
                return Err(PluginError::NoEntry {
                    library: path.to_path_buf(),
                    message: "its dynamic symbol table does not define it; not opened".into(),
                });
            }
        }
        // SAFETY: opening a library runs its initialisers; plugins are
        // trusted code (see the module docs), and that is the whole point.
        let library = unsafe { Library::new(&canonical) }.map_err(|e| PluginError::Open {
            library: path.to_path_buf(),
            message: loader_reason(&e),
        })?;
        // Never unloaded, whatever happens next: once the entry has run, the
        // plugin may hold threads, thread-locals and destructors that must
        // not outlive its code.
        let library: &'static Library = Box::leak(Box::new(library));
        // SAFETY: the entry symbol has this type in every ABI version.
        let entry = unsafe { library.get::<Infl8PluginEntryFn>(INFL8_ENTRY_SYMBOL) }
            .map(|symbol| *symbol)
            .map_err(|e| PluginError::NoEntry {
                library: path.to_path_buf(),
                message: loader_reason(&e),
            })?;
        // SAFETY: `entry` comes from a library that exports the ABI's entry
        // symbol and stays loaded for the process.
        unsafe { self.attach(path.to_path_buf(), canonical, entry) }
    }

    /// Registers a plugin linked into this binary (no library to open), e.g.
    /// a statically linked default backend. `label` stands in for the
    /// library path in listings and errors.
    ///
    /// # Safety
    /// `entry` must implement the infl8 plugin ABI (as the entry generated by
    /// [`export_plugin!`](crate::export_plugin) does) and its code must stay
    /// valid for the rest of the process.
    pub unsafe fn register_entry(
        &mut self,
        label: impl Into<PathBuf>,
        entry: Infl8PluginEntryFn,
    ) -> Result<PluginSummary, PluginError> {
        let label = label.into();
        // SAFETY: forwarded from the caller.
        unsafe { self.attach(label.clone(), label, entry) }
    }

    /// Every backend the host can hand out, in registration order.
    pub fn backends(&self) -> Vec<BackendInfo> {
        self.backends.iter().map(|b| b.info.clone()).collect()
    }

    /// Summaries of the libraries loaded so far.
    pub fn libraries(&self) -> Vec<PluginSummary> {
        self.libraries.iter().map(|l| l.summary.clone()).collect()
    }

    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> Result<Arc<dyn Backend>, PluginError> {
        match self.backends.iter().find(|b| b.info.name == name) {
            Some(b) => Ok(b.backend.clone()),
            None => Err(PluginError::UnknownBackend {
                name: name.to_owned(),
                available: self
                    .backends
                    .iter()
                    .map(|b| format!("{} ({})", b.info.name, b.info.library.display()))
                    .collect(),
                searched: self.search_dirs.clone(),
            }),
        }
    }

    /// Calls a plugin's entry, checks its table and registers its backends.
    ///
    /// # Safety
    /// `entry` must be a plugin entry whose code stays loaded for the process.
    unsafe fn attach(
        &mut self,
        library: PathBuf,
        canonical: PathBuf,
        entry: Infl8PluginEntryFn,
    ) -> Result<PluginSummary, PluginError> {
        let api = host_api(&library);
        let mut table: *const Infl8PluginTable = ptr::null();
        // SAFETY: the entry's signature is fixed by the ABI; `api` is valid
        // for the process and `table` is writable.
        let status = unsafe { entry(INFL8_ABI_VERSION, api, &mut table) };
        if table.is_null() {
            return Err(if status == INFL8_OK {
                PluginError::InvalidTable {
                    library,
                    reason: "the entry returned OK but no table".into(),
                }
            } else {
                PluginError::EntryFailed { library, status }
            });
        }
        if let Some(lib) = self.libraries.iter().find(|l| l.table == table as usize) {
            return Ok(lib.summary.clone());
        }
        // SAFETY: the table's plugin-owned memory lives as long as the
        // library, i.e. forever.
        let checked = unsafe { check_table(&library, status, table) }?;

        let fns = Arc::new(PluginFns {
            library: library.clone(),
            model_load: checked.model_load,
            model_free: checked.model_free,
            model_io: checked.model_io,
            model_run: checked.model_run,
            tensor_free: checked.tensor_free,
            options_check: checked.options_check,
            abi_version: checked.abi_version,
        });
        let mut summary = PluginSummary {
            library: library.clone(),
            plugin: checked.plugin.clone(),
            version: checked.version.clone(),
            abi: version_string(checked.abi_version),
            backends: Vec::new(),
            shadowed: Vec::new(),
        };
        for (index, (name, description)) in checked.backends.into_iter().enumerate() {
            if let Some(first) = self.backends.iter().find(|b| b.info.name == name) {
                tracing::warn!(
                    "backend `{name}` of {} is shadowed by the one from {}",
                    library.display(),
                    first.info.library.display()
                );
                summary.shadowed.push(name);
                continue;
            }
            let info = BackendInfo {
                name: name.clone(),
                description: description.clone(),
                plugin: checked.plugin.clone(),
                version: checked.version.clone(),
                library: library.clone(),
            };
            let backend = Arc::new(PluginBackend {
                fns: fns.clone(),
                // Bounded by MAX_BACKENDS in check_table.
                index: index as u32,
                name,
                description,
            });
            summary.backends.push(info.name.clone());
            self.backends.push(RegisteredBackend { info, backend });
        }
        tracing::debug!(
            library = %library.display(),
            plugin = %summary.plugin,
            version = %summary.version,
            backends = ?summary.backends,
            "plugin loaded"
        );
        self.libraries.push(LoadedLibrary {
            canonical,
            table: table as usize,
            summary: summary.clone(),
        });
        Ok(summary)
    }
}

/// A table that passed every check, copied out of plugin memory.
struct CheckedTable {
    abi_version: u32,
    plugin: String,
    version: String,
    backends: Vec<(String, String)>,
    model_load: Infl8ModelLoadFn,
    model_free: Infl8ModelFreeFn,
    model_io: Infl8ModelIoFn,
    model_run: Infl8ModelRunFn,
    tensor_free: Infl8TensorFreeFn,
    options_check: Option<Infl8OptionsCheckFn>,
}

/// Checks a table the entry returned: version first (only the frozen header
/// is readable before that), then size, strings and functions.
///
/// # Safety
/// `table` must be non-null and point to plugin memory that stays valid.
unsafe fn check_table(
    library: &Path,
    status: i32,
    table: *const Infl8PluginTable,
) -> Result<CheckedTable, PluginError> {
    let invalid = |reason: String| PluginError::InvalidTable {
        library: library.to_path_buf(),
        reason,
    };
    if !table.is_aligned() {
        return Err(invalid("the table pointer is misaligned".into()));
    }
    // SAFETY: `abi_version` and `struct_size` lead the table in every
    // version; only they are read until the size is known.
    let (abi_version, struct_size) = unsafe { ((*table).abi_version, (*table).struct_size) };
    let header = if struct_size as usize >= size_of::<Infl8PluginHeader>() {
        // SAFETY: the table declares itself at least header-sized, and the
        // header's fields are frozen across every major.
        Some(unsafe { ptr::read(table.cast::<Infl8PluginHeader>()) })
    } else {
        None
    };
    let name_of = |p: Option<*const c_char>| {
        // SAFETY: strings in the header are null or NUL-terminated (ABI).
        p.and_then(|p| unsafe { lossy(p) })
            .map_or_else(|| "?".to_owned(), Cow::into_owned)
    };
    let plugin = name_of(header.map(|h| h.plugin_name));
    let version = name_of(header.map(|h| h.plugin_version));

    if abi_major(abi_version) != INFL8_ABI_MAJOR {
        return Err(PluginError::AbiMismatch {
            library: library.to_path_buf(),
            plugin,
            version,
            plugin_abi: version_string(abi_version),
            host_abi: version_string(INFL8_ABI_VERSION),
        });
    }
    if status != INFL8_OK {
        return Err(PluginError::EntryFailed {
            library: library.to_path_buf(),
            status,
        });
    }
    if struct_size < Infl8PluginTable::MIN_SIZE {
        return Err(invalid(format!(
            "the table is {struct_size} bytes, ABI {} needs at least {}",
            version_string(abi_version),
            Infl8PluginTable::MIN_SIZE
        )));
    }
    // SAFETY: every field of the table is an integer, a raw pointer or an
    // `Option` of a function pointer, for which all-zero bytes are valid
    // (0, null, `None`).
    let mut t: Infl8PluginTable = unsafe { std::mem::zeroed() };
    let covered = (struct_size as usize).min(size_of::<Infl8PluginTable>());
    // SAFETY: the plugin's table holds `struct_size` readable bytes (at
    // least ABI 1.0's, checked above); no more than that, and no more than
    // the host's struct, are copied.
    unsafe {
        ptr::copy_nonoverlapping(table.cast::<u8>(), (&raw mut t).cast::<u8>(), covered);
    }
    if header.is_some_and(|h| h.plugin_name.is_null()) {
        return Err(invalid("plugin_name is null".into()));
    }

    let missing = |what: &str| invalid(format!("{what} is null"));
    let model_load = t.model_load.ok_or_else(|| missing("model_load"))?;
    let model_free = t.model_free.ok_or_else(|| missing("model_free"))?;
    let model_io = t.model_io.ok_or_else(|| missing("model_io"))?;
    let model_run = t.model_run.ok_or_else(|| missing("model_run"))?;
    let tensor_free = t.tensor_free.ok_or_else(|| missing("tensor_free"))?;
    // ABI 1.2, optional: null (or beyond an older table) means "not checked".
    let options_check = t.options_check;

    if t.backend_count > MAX_BACKENDS {
        return Err(invalid(format!(
            "it declares {} backends (at most {MAX_BACKENDS})",
            t.backend_count
        )));
    }
    let stride = t.backend_desc_size as usize;
    if t.backend_count > 0 {
        if stride < size_of::<Infl8BackendDesc>()
            || !stride.is_multiple_of(align_of::<Infl8BackendDesc>())
        {
            return Err(invalid(format!("backend_desc_size {stride} is not usable")));
        }
        if t.backends.is_null() || !t.backends.is_aligned() {
            return Err(invalid("backends is null or misaligned".into()));
        }
    }
    let mut backends: Vec<(String, String)> = Vec::with_capacity(t.backend_count as usize);
    for i in 0..t.backend_count as usize {
        // SAFETY: the plugin declares `backend_count` descriptors `stride`
        // bytes apart, each starting with the ABI 1.0 fields; the stride is
        // a multiple of the descriptor's alignment.
        let desc = unsafe {
            ptr::read(
                t.backends
                    .cast::<u8>()
                    .add(i * stride)
                    .cast::<Infl8BackendDesc>(),
            )
        };
        if desc.name.is_null() {
            return Err(invalid(format!("backend {i} has no name")));
        }
        // SAFETY: non-null, NUL-terminated by the ABI.
        let name = unsafe { CStr::from_ptr(desc.name) }
            .to_str()
            .map_err(|_| invalid(format!("the name of backend {i} is not UTF-8")))?
            .to_owned();
        if name.is_empty() || backends.iter().any(|(n, _)| *n == name) {
            return Err(invalid(format!(
                "backend name `{name}` is empty or repeated"
            )));
        }
        // SAFETY: null or NUL-terminated by the ABI.
        let description = unsafe { lossy(desc.description) }
            .map(Cow::into_owned)
            .unwrap_or_default();
        backends.push((name, description));
    }
    Ok(CheckedTable {
        abi_version,
        plugin,
        version,
        backends,
        model_load,
        model_free,
        model_io,
        model_run,
        tensor_free,
        options_check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_file_names() {
        let so = |n: &str| {
            PathBuf::from(format!(
                "/x/{}{n}{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            ))
        };
        assert!(PluginHost::is_plugin_file_name(&so("infl8_tract")));
        assert!(!PluginHost::is_plugin_file_name(&so("infl8test_faulty")));
        assert!(!PluginHost::is_plugin_file_name(&so("tract")));
        assert!(!PluginHost::is_plugin_file_name(Path::new(
            "/x/libinfl8_tract.rlib"
        )));
    }

    #[test]
    fn missing_library_is_named() {
        let mut host = PluginHost::new(vec![]);
        let e = host
            .load_library("/nonexistent/libinfl8_nope.so")
            .unwrap_err();
        assert!(matches!(e, PluginError::NotFound { .. }));
        assert!(
            e.to_string().contains("/nonexistent/libinfl8_nope.so"),
            "{e}"
        );
    }

    #[test]
    fn unknown_backend_lists_what_exists() {
        let host = PluginHost::new(vec![PathBuf::from("/opt/plugins")]);
        let e = host.backend("cuda").err().unwrap().to_string();
        assert!(e.contains("`cuda`"), "{e}");
        assert!(e.contains("available: (none)"), "{e}");
        assert!(e.contains("/opt/plugins"), "{e}");
    }
}
