//! A minimal reader for NumPy `.npy` files holding little-endian f32 or
//! f64 in C order (what the golden fixtures are). Anything else is refused
//! with an error rather than misread: a fixture written another way must
//! fail loudly.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use ndarray::{ArrayD, IxDyn};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Reads a `.npy` file of little-endian f32 in C order.
pub fn read_f32(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    read(path.as_ref(), parse_f32)
}

/// Reads a `.npy` file of little-endian f64 in C order (affines).
pub fn read_f64(path: impl AsRef<Path>) -> Result<ArrayD<f64>> {
    read(path.as_ref(), parse_f64)
}

fn read<T>(path: &Path, parse: fn(&[u8]) -> Result<ArrayD<T>>) -> Result<ArrayD<T>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{} is not a usable .npy file", path.display()))
}

/// Parses the bytes of a `.npy` file of little-endian f32 in C order.
pub fn parse_f32(bytes: &[u8]) -> Result<ArrayD<f32>> {
    parse(bytes, "<f4", f32::from_le_bytes)
}

/// Parses the bytes of a `.npy` file of little-endian f64 in C order.
pub fn parse_f64(bytes: &[u8]) -> Result<ArrayD<f64>> {
    parse(bytes, "<f8", f64::from_le_bytes)
}

/// Parses a `.npy` file whose elements are `N`-byte `dtype` values.
fn parse<T, const N: usize>(
    bytes: &[u8],
    dtype: &str,
    decode: fn([u8; N]) -> T,
) -> Result<ArrayD<T>> {
    ensure!(bytes.starts_with(MAGIC), "missing the \\x93NUMPY magic");
    let version = bytes.get(6..8).context("truncated before the version")?;
    // Version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one.
    let (header_len, start) = match version[0] {
        1 => {
            let n = bytes.get(8..10).context("truncated header length")?;
            (u16::from_le_bytes([n[0], n[1]]) as usize, 10)
        }
        2 | 3 => {
            let n = bytes.get(8..12).context("truncated header length")?;
            (u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize, 12)
        }
        v => bail!("unsupported .npy version {v}.{}", version[1]),
    };
    let header = bytes
        .get(start..start + header_len)
        .context("truncated header")?;
    let header = std::str::from_utf8(header).context("header is not text")?;

    let descr = field(header, "descr")?;
    ensure!(
        descr == format!("'{dtype}'") || descr == format!("\"{dtype}\""),
        "dtype {descr} is not '{dtype}'"
    );
    let fortran = field(header, "fortran_order")?;
    ensure!(
        fortran == "False",
        "fortran_order is {fortran}, only C order is supported"
    );
    let shape = parse_shape(field(header, "shape")?)?;

    let data = &bytes[start + header_len..];
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("shape overflows")?;
    ensure!(
        Some(data.len()) == count.checked_mul(N),
        "shape {shape:?} needs {count} x {N} bytes of data, the file has {}",
        data.len()
    );
    let (chunks, _) = data.as_chunks::<N>();
    let values = chunks.iter().copied().map(decode).collect();
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), values)?)
}

/// The raw text of `key`'s value in the header's Python dict literal.
fn field<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let pattern = format!("'{key}':");
    let at = header
        .find(&pattern)
        .with_context(|| format!("header has no '{key}': {header}"))?;
    let rest = header[at + pattern.len()..].trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')').context("unterminated shape tuple")? + 1
    } else {
        rest.find([',', '}'])
            .with_context(|| format!("unterminated value of '{key}'"))?
    };
    Ok(rest[..end].trim())
}

/// `(16, 12, 16)`, `(5,)` or `()`.
fn parse_shape(text: &str) -> Result<Vec<usize>> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .with_context(|| format!("shape {text} is not a tuple"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("shape {text} has a bad size {s:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_c_order_f32() {
        let bytes = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n",
            &floats(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]),
        );
        let a = parse_f32(&bytes).unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(a[[1, 2]], 6.5);
        let one = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\n",
            &floats(&[7.0]),
        );
        assert_eq!(parse_f32(&one).unwrap().shape(), &[1]);
    }

    #[test]
    fn reads_c_order_f64() {
        let data: Vec<u8> = [1.5f64, -2.25, 1e-300]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let bytes = npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }\n",
            &data,
        );
        assert_eq!(
            parse_f64(&bytes).unwrap().as_slice().unwrap(),
            &[1.5, -2.25, 1e-300]
        );
        // The same bytes are not f32, and f32 data is not f64.
        assert!(parse_f32(&bytes).is_err());
        let f = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n",
            &floats(&[1.0, 2.0]),
        );
        assert!(parse_f64(&f).is_err());
    }

    #[test]
    fn refuses_anything_else() {
        let data = floats(&[0.0; 6]);
        for header in [
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
            "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }",
            "{'descr': '<f4', 'fortran_order': False }",
        ] {
            assert!(parse_f32(&npy(header, &data)).is_err(), "{header}");
        }
        assert!(parse_f32(b"\x93NUMPX\x01\x00").is_err());
        assert!(parse_f32(&npy("{'descr': '<f4'", &[])[..12]).is_err());
    }
}
