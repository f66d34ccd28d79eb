//! The arithmetic a backend may use, as settings name it.

use serde::{Deserialize, Serialize};

/// Arithmetic the backend may use: `fp32` (default), `fp16` (TensorRT
/// builds FP16 kernels) or `int8` (TensorRT INT8; the model must be an INT8
/// QDQ model from `infl8-train quantize`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
// Through `FromStr`: the `config` crate's own enum error ("enum Precision
// does not have variant constructor fp8") names neither the accepted values
// nor, for a user, the setting.
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Int8,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Fp16, Precision::Int8];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }
}

/// A text that names no [`Precision`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a precision (expected fp32, fp16 or int8)")]
pub struct ParsePrecisionError(pub String);

impl std::str::FromStr for Precision {
    type Err = ParsePrecisionError;

    /// `fp32`, `fp16` or `int8`, in any case (environment variables are
    /// often written in upper case).
    fn from_str(s: &str) -> Result<Self, ParsePrecisionError> {
        let want = s.trim().to_ascii_lowercase();
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str() == want)
            .ok_or_else(|| ParsePrecisionError(s.to_owned()))
    }
}

impl TryFrom<String> for Precision {
    type Error = ParsePrecisionError;

    fn try_from(s: String) -> Result<Self, ParsePrecisionError> {
        s.parse()
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_any_case_and_names_a_bad_value() {
        assert_eq!(" FP16".parse::<Precision>(), Ok(Precision::Fp16));
        let e = "fp8".parse::<Precision>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "`fp8` is not a precision (expected fp32, fp16 or int8)"
        );
        assert_eq!(serde_json::to_value(Precision::Int8).unwrap(), "int8");
    }
}
