//! The committed C header is what cbindgen makes of `backend/src/abi.rs`
//! today, and a C compiler lays its structs out byte for byte as Rust does.
//! `INFL8_BLESS=1` rewrites the header instead of failing.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use infl8_backend::abi::*;
use infl8_plugin_sdk::{generate_header, header_path, sdk_dir};

#[test]
fn committed_header_is_up_to_date() {
    let generated = generate_header().expect("cbindgen");
    let path = header_path();
    if std::env::var_os("INFL8_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write the header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one file is a prefix of the other".to_owned(),
                |i| format!("first difference at line {}", i + 1),
            );
        panic!(
            "{} is out of date with backend/src/abi.rs ({first}); regenerate it with \
             `INFL8_BLESS=1 cargo test -p infl8-plugin-sdk --test header` and commit it",
            path.display()
        );
    }
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// Compiles `source` (C, or C++ with `cxx`) against the SDK header, syntax only.
fn compile(source: &str, cxx: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(if cxx { "check.cpp" } else { "check.c" });
    std::fs::write(&file, source).expect("write the check source");
    let (compiler, std) = if cxx {
        (
            std::env::var("CXX").unwrap_or_else(|_| "c++".into()),
            "-std=c++11",
        )
    } else {
        (cc(), "-std=c11")
    };
    let out = Command::new(&compiler)
        .args([
            std,
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-I",
        ])
        .arg(sdk_dir().join("include"))
        .arg(&file)
        .output()
        .map_err(|e| format!("cannot run `{compiler}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `_Static_assert`s of every struct's size and every field's offset as
/// Rust computes them, and of the constants' values.
fn layout_assertions() -> String {
    let mut c = String::from("#include <stddef.h>\n#include \"infl8_plugin.h\"\n");
    macro_rules! layout {
        ($ty:ident { $($field:ident),* $(,)? }) => {{
            c += &format!(
                "_Static_assert(sizeof({}) == {}, \"sizeof({})\");\n",
                stringify!($ty), size_of::<$ty>(), stringify!($ty)
            );
            $(c += &format!(
                "_Static_assert(offsetof({ty}, {f}) == {off}, \"offsetof({ty}, {f})\");\n",
                ty = stringify!($ty), f = stringify!($field), off = offset_of!($ty, $field)
            );)*
        }};
    }
    layout!(Infl8HostApi {
        abi_version,
        struct_size,
        log_max_level,
        reserved,
        log_ctx,
        log,
        rust_tracing_compat,
        rust_tracing_dispatch,
    });
    layout!(Infl8BackendDesc { name, description });
    layout!(Infl8PluginTable {
        abi_version,
        struct_size,
        plugin_name,
        plugin_version,
        backend_count,
        backend_desc_size,
        backends,
        model_load,
        model_free,
        model_io,
        model_run,
        tensor_free,
    });
    layout!(Infl8PluginHeader {
        abi_version,
        struct_size,
        plugin_name,
        plugin_version,
    });
    layout!(Infl8TensorDesc {
        name,
        rank,
        reserved,
        dims
    });
    layout!(Infl8ModelIo {
        struct_size,
        reserved,
        input,
        output
    });
    layout!(Infl8TensorOut {
        struct_size,
        rank,
        shape,
        data,
        len,
        owner,
    });
    macro_rules! constants {
        ($($name:ident),* $(,)?) => {$(
            c += &format!(
                "_Static_assert({} == {}, \"{}\");\n",
                stringify!($name), $name as i64, stringify!($name)
            );
        )*};
    }
    constants!(
        INFL8_ABI_MAJOR,
        INFL8_ABI_MINOR,
        INFL8_ABI_VERSION,
        INFL8_MAX_RANK,
        INFL8_DIM_SYMBOLIC,
        INFL8_OK,
        INFL8_ERROR,
        INFL8_INVALID_ARGUMENT,
        INFL8_PANIC,
        INFL8_UNSUPPORTED,
        INFL8_ABI_MISMATCH,
        INFL8_LOAD_FAILED,
        INFL8_SHAPE_MISMATCH,
        INFL8_RUN_FAILED,
        INFL8_UNAVAILABLE,
        INFL8_LOG_OFF,
        INFL8_LOG_ERROR,
        INFL8_LOG_WARN,
        INFL8_LOG_INFO,
        INFL8_LOG_DEBUG,
        INFL8_LOG_TRACE,
    );
    // The entry's declaration in the header must match the Rust type.
    c += "static Infl8PluginEntryFn entry_has_the_declared_type = infl8_plugin_entry;\n";
    c += "void *use_it(void) { return (void *)&entry_has_the_declared_type; }\n";
    c
}

#[test]
fn c_compiler_agrees_on_layout_and_constants() {
    let source = layout_assertions();
    // Every struct and constant is covered: a new field without an
    // assertion would slip past, so count what the header declares.
    let header = std::fs::read_to_string(header_path()).expect("read the header");
    let defines = header.matches("#define INFL8_").count();
    // INFL8_PLUGIN_H and INFL8_EXPORT (twice: Windows and elsewhere) are not constants.
    assert_eq!(
        defines - 3,
        21,
        "a constant was added: assert its value here"
    );
    compile(&source, false)
        .unwrap_or_else(|e| panic!("layout mismatch:\n{e}\n--- source:\n{source}"));
}

#[test]
fn header_compiles_as_cxx() {
    let source = format!(
        "#include \"infl8_plugin.h\"\n\
         static_assert(sizeof(Infl8TensorOut) == {}, \"Infl8TensorOut\");\n\
         int main() {{ const Infl8PluginTable *t = nullptr; return t ? 1 : 0; }}\n",
        size_of::<Infl8TensorOut>()
    );
    compile(&source, true).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_layout_change_is_caught() {
    // The check must be able to fail: a wrong offset is a compile error.
    let bad = layout_assertions().replace(
        &format!(
            "offsetof(Infl8TensorOut, owner) == {}",
            offset_of!(Infl8TensorOut, owner)
        ),
        "offsetof(Infl8TensorOut, owner) == 1",
    );
    assert!(compile(&bad, false).is_err());
}

#[test]
fn header_names_the_abi_source() {
    let header = std::fs::read_to_string(header_path()).expect("read the header");
    assert!(header.contains("backend/src/abi.rs"));
    assert!(Path::new(&infl8_plugin_sdk::abi_source()).is_file());
}
