//! The C side of the infl8 plugin ABI.
//!
//! `include/infl8_plugin.h` is generated from `backend/src/abi.rs` (the
//! one definition of the ABI) by [`generate_header`]; the tests check that
//! the committed header is what the Rust definitions produce today, and that
//! a C compiler lays its structs out exactly as Rust does.

use std::path::{Path, PathBuf};

/// The SDK folder (`plugins/sdk`).
pub fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed header, `plugins/sdk/include/infl8_plugin.h`.
pub fn header_path() -> PathBuf {
    sdk_dir().join("include/infl8_plugin.h")
}

/// The Rust source the header is generated from.
pub fn abi_source() -> PathBuf {
    sdk_dir().join("../../backend/src/abi.rs")
}

/// Generates the header text from [`abi_source`] with `cbindgen.toml`.
pub fn generate_header() -> Result<String, String> {
    generate_header_from(&abi_source(), &sdk_dir().join("cbindgen.toml"))
}

fn generate_header_from(src: &Path, config: &Path) -> Result<String, String> {
    let config =
        cbindgen::Config::from_file(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(src)
        .generate()
        .map_err(|e| format!("cbindgen on {}: {e}", src.display()))?;
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).map_err(|e| format!("cbindgen wrote invalid UTF-8: {e}"))
}
