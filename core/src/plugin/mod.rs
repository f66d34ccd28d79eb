//! Backend plugins: the host that loads libraries, and the raw client of the
//! ABI it and the conformance kit call plugins through. The ABI itself and
//! the export macro live in infl8-backend (re-exported here).
//!
//! - [`abi`]: the `#[repr(C)]` contract (ABI 1.1), written so a C header can
//!   be generated from it and a vendor can write a plugin in C.
//! - [`raw`]: the calls through a plugin's function table, with the checks
//!   of what comes back, and nothing else.
//! - [`PluginHost`]: finds `libinfl8_*.so` (platform suffix) in its search
//!   directories, loads them with `libloading`, checks their ABI version and
//!   hands out their backends as ordinary [`crate::Backend`]s.
//! - [`PluginHost::load_model`]: loads a model on the first backend of a
//!   fallback chain that can, logging each fallback ([`load_with_fallback`]).
//! - [`export_plugin!`](crate::export_plugin): turns a list of Rust
//!   [`crate::Backend`]s into a plugin library; [`export`] holds the glue.
//!   Plugin crates use it from infl8-backend, which they depend on alone.
//!
//! ```ignore
//! // in a plugin crate (crate-type = ["cdylib"], lib name `infl8_<something>`)
//! infl8_backend::export_plugin! {
//!     name: "tract",
//!     version: env!("CARGO_PKG_VERSION"),
//!     backends: [Box::new(TractBackend::new())],
//! }
//!
//! // in the host
//! let mut host = PluginHost::new(vec!["/opt/infl8/plugins".into()]);
//! for (path, result) in host.discover() {
//!     if let Err(e) = result { tracing::warn!("{e}") }
//! }
//! let backend = host.backend("tract")?;
//! let model = backend.load(Path::new("model.onnx"), &LoadOptions::default())?;
//! ```

pub use infl8_backend::{abi, export};
mod chain;
#[cfg(target_os = "linux")]
mod elf;
mod host;
mod host_api;
pub mod raw;

pub use abi::{INFL8_ABI_MAJOR, INFL8_ABI_MINOR, INFL8_ABI_VERSION};
pub use chain::{BackendFailure, ChainError, ChainLoad, load_with_fallback};
pub use host::{BackendInfo, PluginError, PluginHost, PluginSummary};
pub use raw::check_output;
#[cfg(feature = "fuzzing")]
pub(crate) use raw::{check_run_output, tensor_info};

#[cfg(test)]
mod tests {
    //! The whole ABI round trip in one process: a plugin exported with the
    //! macro, registered through its entry, driven through the host's
    //! wrappers.

    use std::ffi::c_char;
    use std::path::{Path, PathBuf};
    use std::ptr;

    use super::abi::*;
    use super::{PluginError, PluginHost};
    use crate::backend::{Backend, BackendError, Dim, LoadOptions, Model, Tensor, TensorInfo};

    #[derive(Clone, Copy)]
    enum Behaviour {
        Double,
        PanicLoad,
        PanicRun,
    }

    struct TestBackend(&'static str, Behaviour);

    impl Backend for TestBackend {
        fn name(&self) -> &str {
            self.0
        }

        fn description(&self) -> &str {
            "in-process test backend"
        }

        fn load(&self, model: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
            if let Behaviour::PanicLoad = self.1 {
                panic!("boom in load of {}", model.display());
            }
            if model.as_os_str() == "missing.onnx" {
                return Err(BackendError::Load {
                    path: model.display().to_string(),
                    message: "no such file".into(),
                });
            }
            if model.as_os_str() == "needs-gpu.onnx" {
                return Err(BackendError::Unavailable("no GPU here".into()));
            }
            let factor = opts
                .extra
                .get("factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(2.0) as f32;
            let info = |name: &str| TensorInfo {
                name: name.into(),
                shape: vec![Dim::Symbolic("batch".into()), Dim::Fixed(3)],
            };
            Ok(Box::new(TestModel {
                behaviour: self.1,
                factor,
                input: info("x"),
                output: info("y"),
            }))
        }
    }

    struct TestModel {
        behaviour: Behaviour,
        factor: f32,
        input: TensorInfo,
        output: TensorInfo,
    }

    impl Model for TestModel {
        fn input(&self) -> &TensorInfo {
            &self.input
        }

        fn output(&self) -> &TensorInfo {
            &self.output
        }

        fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
            if let Behaviour::PanicRun = self.behaviour {
                panic!("boom in run");
            }
            if shape[0] == 7 {
                return Err(BackendError::Run("seven is unlucky".into()));
            }
            Tensor::from_vec(
                shape.to_vec(),
                data.iter().map(|v| v * self.factor).collect(),
            )
        }
    }

    crate::export_plugin! {
        name: "in-process",
        version: "9.8.7",
        backends: [
            Box::new(TestBackend("double", Behaviour::Double)),
            Box::new(TestBackend("panic-load", Behaviour::PanicLoad)),
            Box::new(TestBackend("panic-run", Behaviour::PanicRun)),
        ],
    }

    fn host() -> PluginHost {
        let mut host = PluginHost::new(vec![]);
        // SAFETY: the entry was generated by the export macro in this binary.
        let summary = unsafe { host.register_entry("<in-process>", infl8_plugin_entry) }.unwrap();
        assert_eq!(summary.plugin, "in-process");
        assert_eq!(summary.version, "9.8.7");
        assert_eq!(summary.abi, version_string(INFL8_ABI_VERSION));
        assert_eq!(summary.backends, ["double", "panic-load", "panic-run"]);
        host
    }

    #[test]
    fn round_trip_runs_and_describes() {
        let host = host();
        let infos = host.backends();
        assert_eq!(infos[0].name, "double");
        assert_eq!(infos[0].description, "in-process test backend");
        assert_eq!(infos[0].library, PathBuf::from("<in-process>"));

        let backend = host.backend("double").unwrap();
        let mut opts = LoadOptions::default();
        opts.extra.insert("factor".into(), 3.0.into());
        let model = backend.load(Path::new("m.onnx"), &opts).unwrap();
        assert_eq!(model.input().name, "x");
        assert_eq!(model.output().name, "y");
        // Symbol names do not cross ABI 1: a symbolic batch comes back as N.
        assert_eq!(
            model.input().shape,
            vec![Dim::Symbolic("N".into()), Dim::Fixed(3)]
        );

        let out = model.run(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        assert_eq!(out.shape(), &[2, 3]);
        assert_eq!(out.data(), &[3.0, 6.0, 9.0, 12.0, 15.0, 18.0]);

        let empty = model.run(&[], &[0, 3]).unwrap();
        assert_eq!(empty.shape(), &[0, 3]);
        assert!(empty.data().is_empty());
    }

    #[test]
    fn models_run_concurrently() {
        let host = host();
        let model = host
            .backend("double")
            .unwrap()
            .load(Path::new("m.onnx"), &LoadOptions::default())
            .unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let model = &model;
                s.spawn(move || {
                    for i in 0..50 {
                        let v = (t * 100 + i) as f32;
                        let out = model.run(&[v, v, v], &[1, 3]).unwrap();
                        assert_eq!(out.into_vec(), vec![2.0 * v; 3]);
                    }
                });
            }
        });
    }

    #[test]
    fn failures_cross_as_errors() {
        let host = host();
        let double = host.backend("double").unwrap();

        let e = double
            .load(Path::new("missing.onnx"), &LoadOptions::default())
            .err()
            .unwrap();
        match e {
            BackendError::Load { path, message } => {
                assert_eq!(path, "missing.onnx");
                assert_eq!(message, "no such file");
            }
            other => panic!("{other:?}"),
        }

        // "Cannot run here" crosses as its own kind, not as a load failure.
        let e = double
            .load(Path::new("needs-gpu.onnx"), &LoadOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(&e, BackendError::Unavailable(m) if m == "no GPU here"),
            "{e:?}"
        );

        let model = double
            .load(Path::new("m.onnx"), &LoadOptions::default())
            .unwrap();
        let e = model.run(&[0.0; 21], &[7, 3]).unwrap_err();
        assert!(
            matches!(&e, BackendError::Run(m) if m == "seven is unlucky"),
            "{e:?}"
        );
        let e = model.run(&[0.0; 4], &[1, 4]).unwrap_err();
        assert!(matches!(e, BackendError::Shape { .. }), "{e:?}");
        let e = model.run(&[0.0; 5], &[2, 3]).unwrap_err();
        assert!(e.to_string().contains("needs 6"), "{e}");

        let e = host
            .backend("panic-load")
            .unwrap()
            .load(Path::new("m.onnx"), &LoadOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(&e, BackendError::Panic(m) if m == "boom in load of m.onnx"),
            "{e:?}"
        );

        let model = host
            .backend("panic-run")
            .unwrap()
            .load(Path::new("m.onnx"), &LoadOptions::default())
            .unwrap();
        for _ in 0..2 {
            let e = model.run(&[0.0; 3], &[1, 3]).unwrap_err();
            assert!(
                matches!(&e, BackendError::Panic(m) if m == "boom in run"),
                "{e:?}"
            );
        }
        // Still alive and well.
        let out = double
            .load(Path::new("m.onnx"), &LoadOptions::default())
            .unwrap()
            .run(&[1.0; 3], &[1, 3])
            .unwrap();
        assert_eq!(out.data(), &[2.0; 3]);
    }

    #[test]
    fn registering_twice_is_idempotent() {
        let mut host = host();
        // SAFETY: as in `host()`.
        let again = unsafe { host.register_entry("<again>", infl8_plugin_entry) }.unwrap();
        assert_eq!(again.library, PathBuf::from("<in-process>"));
        assert_eq!(host.backends().len(), 3);
    }

    #[test]
    fn glue_validates_its_arguments() {
        let mut table: *const Infl8PluginTable = ptr::null();
        // SAFETY: valid out pointer, null host allowed.
        let status = unsafe { infl8_plugin_entry(INFL8_ABI_VERSION, ptr::null(), &mut table) };
        assert_eq!(status, INFL8_OK);
        // SAFETY: the entry returned OK with a table that lives forever.
        let t = unsafe { *table };

        let mut err = [0u8; 64];
        let mut model: *mut Infl8Model = ptr::null_mut();
        let load = t.model_load.unwrap();
        // SAFETY: deliberately bad arguments; every pointer passed is valid
        // or null.
        let status = unsafe {
            load(
                0,
                ptr::null(),
                ptr::null(),
                &mut model,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        assert_eq!(status, INFL8_INVALID_ARGUMENT);
        assert_eq!(read_message(&err), "model_path is null");

        let bad_utf8 = b"\xff\xfe\0";
        // SAFETY: as above.
        let status = unsafe {
            load(
                0,
                bad_utf8.as_ptr().cast::<c_char>(),
                ptr::null(),
                &mut model,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        assert_eq!(status, INFL8_INVALID_ARGUMENT);
        assert!(read_message(&err).contains("not valid UTF-8"));

        // SAFETY: as above.
        let status = unsafe {
            load(
                9,
                c"m".as_ptr(),
                ptr::null(),
                &mut model,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        assert_eq!(status, INFL8_INVALID_ARGUMENT);
        assert!(read_message(&err).contains("out of range"));

        // SAFETY: as above.
        let status = unsafe {
            load(
                0,
                c"m".as_ptr(),
                c"{not json".as_ptr(),
                &mut model,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        assert_eq!(status, INFL8_INVALID_ARGUMENT);
        assert!(read_message(&err).starts_with("options_json"));

        // SAFETY: a valid load, then runs with bad arguments on its handle.
        unsafe {
            assert_eq!(
                load(
                    0,
                    c"m".as_ptr(),
                    ptr::null(),
                    &mut model,
                    ptr::null_mut(),
                    0
                ),
                INFL8_OK
            );
            let run = t.model_run.unwrap();
            let mut out: Infl8TensorOut = std::mem::zeroed();
            out.struct_size = 8;
            let shape = [1u64, 3];
            let status = run(
                model,
                [0f32; 3].as_ptr(),
                shape.as_ptr(),
                2,
                &mut out,
                err.as_mut_ptr().cast(),
                err.len(),
            );
            assert_eq!(status, INFL8_INVALID_ARGUMENT);
            assert!(read_message(&err).contains("struct_size"));
            out.struct_size = size_of::<Infl8TensorOut>() as u32;
            let status = run(
                model,
                ptr::null(),
                shape.as_ptr(),
                2,
                &mut out,
                err.as_mut_ptr().cast(),
                err.len(),
            );
            assert_eq!(status, INFL8_INVALID_ARGUMENT);
            let status = run(
                model,
                [0f32; 3].as_ptr(),
                shape.as_ptr(),
                9,
                &mut out,
                err.as_mut_ptr().cast(),
                err.len(),
            );
            assert_eq!(status, INFL8_INVALID_ARGUMENT);
            assert_eq!(t.model_free.unwrap()(model), INFL8_OK);
            assert_eq!(t.model_free.unwrap()(ptr::null_mut()), INFL8_OK);
            assert_eq!(t.tensor_free.unwrap()(ptr::null_mut()), INFL8_OK);
        }

        // A null out_table is refused, not dereferenced.
        // SAFETY: null is what is being tested.
        let status = unsafe { infl8_plugin_entry(INFL8_ABI_VERSION, ptr::null(), ptr::null_mut()) };
        assert_eq!(status, INFL8_INVALID_ARGUMENT);
    }

    #[test]
    fn plugin_refuses_a_foreign_major_but_names_itself() {
        let mut table: *const Infl8PluginTable = ptr::null();
        // SAFETY: valid out pointer; the host pointer is never read for a
        // foreign major.
        let status = unsafe { infl8_plugin_entry(abi_version(2, 0), ptr::null(), &mut table) };
        assert_eq!(status, INFL8_ABI_MISMATCH);
        assert!(!table.is_null());
        // SAFETY: the plugin still handed out its static table.
        let t = unsafe { *table };
        assert_eq!(abi_major(t.abi_version), INFL8_ABI_MAJOR);
        // SAFETY: NUL-terminated static string.
        assert_eq!(
            unsafe { std::ffi::CStr::from_ptr(t.plugin_name) },
            c"in-process"
        );
    }

    // Hand-written entries that break the contract in one way each.

    struct StaticTable(Infl8PluginTable);
    // SAFETY: immutable statics whose pointers point to static strings.
    unsafe impl Sync for StaticTable {}

    const fn table(abi_version: u32, struct_size: u32) -> Infl8PluginTable {
        Infl8PluginTable {
            abi_version,
            struct_size,
            plugin_name: c"broken".as_ptr(),
            plugin_version: c"0.0.1".as_ptr(),
            backend_count: 0,
            backend_desc_size: size_of::<Infl8BackendDesc>() as u32,
            backends: ptr::null(),
            model_load: None,
            model_free: None,
            model_io: None,
            model_run: None,
            tensor_free: None,
        }
    }

    static FUTURE: StaticTable = StaticTable(table(abi_version(99, 0), 24));
    static SHORT: StaticTable = StaticTable(table(INFL8_ABI_VERSION, 40));
    static NO_FNS: StaticTable = StaticTable(table(INFL8_ABI_VERSION, Infl8PluginTable::MIN_SIZE));

    unsafe extern "C" fn future_entry(
        _v: u32,
        _h: *const Infl8HostApi,
        out: *mut *const Infl8PluginTable,
    ) -> i32 {
        // SAFETY: the host passes a writable pointer.
        unsafe { *out = &FUTURE.0 };
        INFL8_ABI_MISMATCH
    }

    unsafe extern "C" fn short_entry(
        _v: u32,
        _h: *const Infl8HostApi,
        out: *mut *const Infl8PluginTable,
    ) -> i32 {
        // SAFETY: as above.
        unsafe { *out = &SHORT.0 };
        INFL8_OK
    }

    unsafe extern "C" fn no_fns_entry(
        _v: u32,
        _h: *const Infl8HostApi,
        out: *mut *const Infl8PluginTable,
    ) -> i32 {
        // SAFETY: as above.
        unsafe { *out = &NO_FNS.0 };
        INFL8_OK
    }

    unsafe extern "C" fn failing_entry(
        _v: u32,
        _h: *const Infl8HostApi,
        _out: *mut *const Infl8PluginTable,
    ) -> i32 {
        INFL8_ERROR
    }

    #[test]
    fn host_refuses_bad_tables() {
        let mut host = PluginHost::new(vec![]);
        // SAFETY: the entry follows the entry's calling convention and
        // returns a static table, however wrong.
        let e = unsafe { host.register_entry("future.so", future_entry) }.unwrap_err();
        assert!(
            matches!(&e, PluginError::AbiMismatch { plugin_abi, .. } if plugin_abi == "99.0"),
            "{e:?}"
        );
        let text = e.to_string();
        let host_abi = format!("ABI {}", version_string(INFL8_ABI_VERSION));
        for needle in ["future.so", "broken 0.0.1", "ABI 99.0", &host_abi] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }

        // SAFETY: as above.
        let e = unsafe { host.register_entry("short.so", short_entry) }.unwrap_err();
        assert!(e.to_string().contains("the table is 40 bytes"), "{e}");

        // SAFETY: as above.
        let e = unsafe { host.register_entry("nofns.so", no_fns_entry) }.unwrap_err();
        assert!(e.to_string().contains("model_load is null"), "{e}");

        // SAFETY: as above.
        let e = unsafe { host.register_entry("failing.so", failing_entry) }.unwrap_err();
        assert!(
            matches!(
                e,
                PluginError::EntryFailed {
                    status: INFL8_ERROR,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("failing.so"));

        assert!(host.backends().is_empty());
        assert!(host.libraries().is_empty());
    }
}
