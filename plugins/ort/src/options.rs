//! The ort plugin's load options: what `LoadOptions::extra` may hold.
//!
//! Values come from TOML, JSON or environment variables (which arrive as
//! strings, or as numbers and booleans where the config layer could parse
//! them), so booleans and integers are accepted in either form.
//!
//! `infl8 config check` runs this very parser through the plugin ABI's
//! `options_check` (`OrtBackend::check_options`), so a profile is judged
//! by the code that will read it.

use std::path::PathBuf;

use infl8_backend::Precision;
use serde_json::{Map, Value};

use super::Provider;

/// Path of the ONNX Runtime shared library (else `ORT_DYLIB_PATH`, else the
/// system loader's `libonnxruntime.so`).
pub const KEY_LIBRARY: &str = "library";
/// CUDA device ordinal for `ort-cuda` and `ort-tensorrt`.
pub const KEY_DEVICE_ID: &str = "device_id";
/// The settings' `precision` (`fp32`, `fp16`, `int8`), given to every
/// backend: `ort-tensorrt` turns it into `trt_fp16` / `trt_int8`.
pub const KEY_PRECISION: &str = "precision";
pub const KEY_TRT_FP16: &str = "trt_fp16";
pub const KEY_TRT_INT8: &str = "trt_int8";
pub const KEY_TRT_ENGINE_CACHE_DIR: &str = "trt_engine_cache_dir";
pub const KEY_TRT_TIMING_CACHE_DIR: &str = "trt_timing_cache_dir";
pub const KEY_TRT_WORKSPACE_SIZE: &str = "trt_workspace_size";
pub const KEY_TRT_DLA_CORE: &str = "trt_dla_core";

/// Every key the plugin reads, on one backend or another.
pub const ALL_KEYS: &[&str] = &[
    KEY_LIBRARY,
    KEY_PRECISION,
    KEY_DEVICE_ID,
    KEY_TRT_FP16,
    KEY_TRT_INT8,
    KEY_TRT_ENGINE_CACHE_DIR,
    KEY_TRT_TIMING_CACHE_DIR,
    KEY_TRT_WORKSPACE_SIZE,
    KEY_TRT_DLA_CORE,
];

const GPU_KEYS: &[&str] = &[KEY_DEVICE_ID];
const TRT_KEYS: &[&str] = &[
    KEY_TRT_FP16,
    KEY_TRT_INT8,
    KEY_TRT_ENGINE_CACHE_DIR,
    KEY_TRT_TIMING_CACHE_DIR,
    KEY_TRT_WORKSPACE_SIZE,
    KEY_TRT_DLA_CORE,
];

/// A load option with a value of the wrong kind.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("load option `{key}`: {message}")]
pub struct OptionError {
    pub key: String,
    pub message: String,
}

/// TensorRT execution provider settings (`trt_*` keys).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrtOptions {
    pub fp16: Option<bool>,
    pub int8: Option<bool>,
    /// Serialized engines are cached here (built once per model and shape).
    pub engine_cache_dir: Option<PathBuf>,
    /// TensorRT's layer timing cache, shared across models.
    pub timing_cache_dir: Option<PathBuf>,
    /// Bytes TensorRT may use as builder workspace.
    pub workspace_size: Option<u64>,
    /// Run on this DLA core (Jetson AGX/Orin), GPU for what DLA cannot run.
    pub dla_core: Option<u32>,
}

/// Everything the ort plugin reads from `LoadOptions::extra`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrtOptions {
    pub library: Option<PathBuf>,
    pub device_id: Option<u32>,
    pub precision: Option<Precision>,
    /// For `ort-tensorrt`, with `precision` applied (see [`OrtOptions::parse`]).
    pub trt: TrtOptions,
}

/// Parsed options plus the keys that were not used, and why.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub options: OrtOptions,
    /// Keys this plugin does not know (worth a warning: a typo?).
    pub unknown: Vec<String>,
    /// Keys for another of the plugin's backends (e.g. `trt_fp16` given to
    /// every `ort-*` backend, read by `ort-cpu`).
    pub other_backend: Vec<String>,
    /// Settings the backend accepts but cannot honour (a warning, once per
    /// load: e.g. `precision = "fp16"` on `ort-cpu`), each `key: why`.
    pub warnings: Vec<String>,
}

impl OrtOptions {
    /// Reads the options `provider` uses from `extra`.
    ///
    /// On `ort-tensorrt`, `precision = "fp16"` sets `trt_fp16` and `"int8"`
    /// sets `trt_int8`, unless that `trt_*` key is given: the explicit key
    /// wins. The CPU and CUDA providers have no such switch (ONNX Runtime
    /// runs the model's own types there), so any other precision than fp32
    /// is a warning, not an error: a profile's precision reaches every
    /// backend of its chain, fallbacks included.
    pub fn parse(extra: &Map<String, Value>, provider: Provider) -> Result<Parsed, OptionError> {
        let mut parsed = Parsed::default();
        let o = &mut parsed.options;
        for (key, value) in extra {
            let applies = match key.as_str() {
                KEY_LIBRARY | KEY_PRECISION => true,
                k if GPU_KEYS.contains(&k) => provider != Provider::Cpu,
                k if TRT_KEYS.contains(&k) => provider == Provider::TensorRt,
                _ => {
                    parsed.unknown.push(key.clone());
                    continue;
                }
            };
            if !applies {
                parsed.other_backend.push(key.clone());
                continue;
            }
            match key.as_str() {
                KEY_LIBRARY => o.library = Some(path(key, value)?),
                KEY_DEVICE_ID => o.device_id = Some(int(key, value)?),
                KEY_PRECISION => o.precision = Some(precision(key, value)?),
                KEY_TRT_FP16 => o.trt.fp16 = Some(boolean(key, value)?),
                KEY_TRT_INT8 => o.trt.int8 = Some(boolean(key, value)?),
                KEY_TRT_ENGINE_CACHE_DIR => o.trt.engine_cache_dir = Some(path(key, value)?),
                KEY_TRT_TIMING_CACHE_DIR => o.trt.timing_cache_dir = Some(path(key, value)?),
                KEY_TRT_WORKSPACE_SIZE => o.trt.workspace_size = Some(int(key, value)?),
                KEY_TRT_DLA_CORE => o.trt.dla_core = Some(int(key, value)?),
                _ => {}
            }
        }
        match (provider, o.precision) {
            (_, None | Some(Precision::Fp32)) => {}
            (Provider::TensorRt, Some(Precision::Fp16)) => {
                o.trt.fp16.get_or_insert(true);
            }
            (Provider::TensorRt, Some(Precision::Int8)) => {
                o.trt.int8.get_or_insert(true);
            }
            (_, Some(p)) => parsed.warnings.push(format!(
                "{KEY_PRECISION}: {} has no switch on {}; it runs the model's own precision \
                 (fp16/int8 kernels are ort-tensorrt's, or come from an fp16/INT8 model file)",
                p.as_str(),
                provider.backend_name()
            )),
        }
        Ok(parsed)
    }
}

fn bad(key: &str, want: &str, value: &Value) -> OptionError {
    OptionError {
        key: key.to_owned(),
        message: format!("expected {want}, got {value}"),
    }
}

fn boolean(key: &str, value: &Value) -> Result<bool, OptionError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(bad(key, "true or false", value)),
        },
        _ => Err(bad(key, "true or false", value)),
    }
}

fn int<T: TryFrom<u64>>(key: &str, value: &Value) -> Result<T, OptionError> {
    let n = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    n.and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| bad(key, "a non-negative integer in range", value))
}

fn precision(key: &str, value: &Value) -> Result<Precision, OptionError> {
    match value {
        Value::String(s) => s.parse().map_err(|_| bad(key, "fp32, fp16 or int8", value)),
        _ => Err(bad(key, "fp32, fp16 or int8", value)),
    }
}

fn path(key: &str, value: &Value) -> Result<PathBuf, OptionError> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Ok(PathBuf::from(s)),
        _ => Err(bad(key, "a non-empty path", value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn tensorrt_reads_every_key_in_either_form() {
        let extra = map(json!({
            "library": "/opt/ort/libonnxruntime.so",
            "device_id": "1",
            "trt_fp16": true,
            "trt_int8": "false",
            "trt_engine_cache_dir": "/var/cache/trt",
            "trt_timing_cache_dir": "/var/cache/trt-timing",
            "trt_workspace_size": 1073741824u64,
            "trt_dla_core": 0,
        }));
        let p = OrtOptions::parse(&extra, Provider::TensorRt).unwrap();
        assert!(p.unknown.is_empty() && p.other_backend.is_empty(), "{p:?}");
        let o = p.options;
        assert_eq!(o.library, Some(PathBuf::from("/opt/ort/libonnxruntime.so")));
        assert_eq!(o.device_id, Some(1));
        assert_eq!(
            o.trt,
            TrtOptions {
                fp16: Some(true),
                int8: Some(false),
                engine_cache_dir: Some("/var/cache/trt".into()),
                timing_cache_dir: Some("/var/cache/trt-timing".into()),
                workspace_size: Some(1 << 30),
                dla_core: Some(0),
            }
        );
    }

    #[test]
    fn keys_for_other_backends_and_unknown_keys_are_sorted_out() {
        let extra = map(json!({"trt_fp16": true, "device_id": 0, "trt_fp61": true}));
        let p = OrtOptions::parse(&extra, Provider::Cpu).unwrap();
        assert_eq!(p.options, OrtOptions::default());
        assert_eq!(p.unknown, ["trt_fp61"]);
        assert_eq!(p.other_backend, ["device_id", "trt_fp16"]);

        let p = OrtOptions::parse(&extra, Provider::Cuda).unwrap();
        assert_eq!(p.options.device_id, Some(0));
        assert_eq!(p.other_backend, ["trt_fp16"]);
    }

    #[test]
    fn precision_switches_tensorrt_unless_a_trt_key_is_explicit() {
        let trt = |extra: Value| {
            let p = OrtOptions::parse(&map(extra), Provider::TensorRt).unwrap();
            assert!(p.warnings.is_empty() && p.unknown.is_empty(), "{p:?}");
            (p.options.trt.fp16, p.options.trt.int8)
        };
        assert_eq!(trt(json!({"precision": "fp32"})), (None, None));
        assert_eq!(trt(json!({"precision": "fp16"})), (Some(true), None));
        assert_eq!(trt(json!({"precision": "int8"})), (None, Some(true)));
        assert_eq!(trt(json!({"precision": "FP16"})), (Some(true), None));
        // The explicit key wins over the profile's precision.
        assert_eq!(
            trt(json!({"precision": "fp16", "trt_fp16": false})),
            (Some(false), None)
        );
        assert_eq!(
            trt(json!({"precision": "int8", "trt_int8": "false", "trt_fp16": true})),
            (Some(true), Some(false))
        );
        assert_eq!(trt(json!({"trt_fp16": true})), (Some(true), None));
    }

    #[test]
    fn precision_on_cpu_and_cuda_is_a_warning_not_an_error() {
        for provider in [Provider::Cpu, Provider::Cuda] {
            let p = OrtOptions::parse(&map(json!({"precision": "fp32"})), provider).unwrap();
            assert!(p.warnings.is_empty() && p.unknown.is_empty(), "{p:?}");
            for want in ["fp16", "int8"] {
                let p = OrtOptions::parse(&map(json!({ "precision": want })), provider).unwrap();
                assert!(p.unknown.is_empty() && p.other_backend.is_empty(), "{p:?}");
                assert_eq!(p.options.trt, TrtOptions::default());
                assert_eq!(p.warnings.len(), 1, "{p:?}");
                let w = &p.warnings[0];
                assert!(
                    w.contains(provider.backend_name()) && w.contains(want) && w.contains("own"),
                    "{w}"
                );
            }
        }
    }

    #[test]
    fn wrong_kinds_name_the_key() {
        let cases = [
            json!({"trt_fp16": "maybe"}),
            json!({"trt_workspace_size": -1}),
            json!({"trt_dla_core": 1e20}),
            json!({"trt_engine_cache_dir": ""}),
            json!({"library": 3}),
            json!({"precision": "fp8"}),
            json!({"precision": 16}),
        ];
        for c in cases {
            let key = map(c.clone()).keys().next().unwrap().clone();
            let e = OrtOptions::parse(&map(c), Provider::TensorRt).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.to_string().contains(&key), "{e}");
        }
    }
}
