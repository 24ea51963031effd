//! The on-disk layout of a bitsandbytes 4-bit weight, as transformers saves it in safetensors
//! (docs/design-notes.md). For a quantized tensor `T` the file holds:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `T` | u8 | `[ceil(n/2), 1]` packed codes |
//! | `T.absmax` | f32 `[nblocks]`, or u8 `[nblocks]` with double quant | |
//! | `T.quant_map` | f32 | `[16]` the NF4 levels |
//! | `T.nested_absmax` | f32 | `[ceil(nblocks/256)]` (double quant only) |
//! | `T.nested_quant_map` | f32 | `[256]` the dynamic map (double quant only) |
//! | `T.quant_state.bitsandbytes__nf4` | u8 | the UTF-8 bytes of a JSON object |
//!
//! The JSON is what Python's `json.dumps` writes for bitsandbytes' non-tensor state, keys in this
//! order: `quant_type`, `blocksize`, `dtype`, `shape`, and with double quant `nested_blocksize`,
//! `nested_dtype`, `nested_offset` (a Python float `repr`). We write the same bytes, so a file we
//! write is byte-identical to the one bitsandbytes writes for the same input.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::{DQ_BLOCKSIZE, DoubleQuant, NF4_LEVELS, Nf4Tensor, Scales, num_blocks, packed_len};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Suffix of the key holding the JSON quant state of an NF4 tensor.
pub const QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";
/// Suffix bitsandbytes uses for FP4 tensors (recognised, to give a clear error).
pub const FP4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__fp4";

/// A tensor ready to be written to safetensors.
#[derive(Debug, Clone, PartialEq)]
pub struct OnDiskTensor {
    /// Key in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl OnDiskTensor {
    fn new(name: String, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> OnDiskTensor {
        OnDiskTensor {
            name,
            dtype,
            shape,
            data,
        }
    }
}

/// `repr()` of a Python float: the shortest digits that round-trip, fixed notation for decimal
/// exponents in -4..16, else `d.ddde±XX`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "d.ddde-N".
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    let body = if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    };
    format!("{sign}{body}")
}

/// The JSON bytes bitsandbytes stores under `T.quant_state.bitsandbytes__nf4`.
pub fn quant_state_json(t: &Nf4Tensor) -> String {
    let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        t.blocksize,
        t.dtype.torch_name(),
        shape.join(", ")
    );
    if let Scales::Double(d) = &t.scales {
        s += &format!(
            ", \"nested_blocksize\": {DQ_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(f64::from(d.offset))
        );
    }
    s.push('}');
    s
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// The tensors bitsandbytes writes for `t` under the key `name`.
pub fn encode(name: &str, t: &Nf4Tensor) -> Vec<OnDiskTensor> {
    let mut out = vec![OnDiskTensor::new(
        name.to_string(),
        Dtype::U8,
        vec![t.packed.len(), 1],
        t.packed.clone(),
    )];
    match &t.scales {
        Scales::Absmax(a) => out.push(OnDiskTensor::new(
            format!("{name}.absmax"),
            Dtype::F32,
            vec![a.len()],
            f32_bytes(a),
        )),
        Scales::Double(d) => {
            out.push(OnDiskTensor::new(
                format!("{name}.absmax"),
                Dtype::U8,
                vec![d.codes.len()],
                d.codes.clone(),
            ));
            out.push(OnDiskTensor::new(
                format!("{name}.nested_absmax"),
                Dtype::F32,
                vec![d.nested_absmax.len()],
                f32_bytes(&d.nested_absmax),
            ));
            out.push(OnDiskTensor::new(
                format!("{name}.nested_quant_map"),
                Dtype::F32,
                vec![256],
                f32_bytes(&d.map[..]),
            ));
        }
    }
    out.push(OnDiskTensor::new(
        format!("{name}.quant_map"),
        Dtype::F32,
        vec![16],
        f32_bytes(&NF4_LEVELS),
    ));
    let json = quant_state_json(t).into_bytes();
    out.push(OnDiskTensor::new(
        format!("{name}{QUANT_STATE_SUFFIX}"),
        Dtype::U8,
        vec![json.len()],
        json,
    ));
    out
}

#[derive(Debug, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
}

/// The keys `T` of a file that are bitsandbytes 4-bit tensors (those with a quant state).
pub fn quantized_names(st: &SafeTensors<'_>) -> Vec<String> {
    let mut v: Vec<String> = st
        .names()
        .into_iter()
        .filter_map(|k| k.strip_suffix(QUANT_STATE_SUFFIX).map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Whether `key` is one of the auxiliary keys of a quantized tensor in `quantized`.
pub fn is_auxiliary(key: &str, quantized: &[String]) -> bool {
    const AUX: [&str; 5] = [
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        QUANT_STATE_SUFFIX,
    ];
    AUX.iter().any(|suffix| {
        key.strip_suffix(suffix)
            .is_some_and(|base| quantized.binary_search_by(|q| q.as_str().cmp(base)).is_ok())
    })
}

fn fmt_err(file: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

fn tensor<'a>(
    st: &'a SafeTensors<'a>,
    file: &Path,
    key: &str,
    dtype: Dtype,
    len: usize,
) -> Result<safetensors::tensor::TensorView<'a>> {
    let t = st
        .tensor(key)
        .map_err(|_| fmt_err(file, format!("missing tensor {key}")))?;
    let n: usize = t.shape().iter().product();
    if t.dtype() != dtype || n != len {
        return Err(fmt_err(
            file,
            format!(
                "tensor {key}: expected {dtype:?} with {len} elements, found {:?} {:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t)
}

fn f32_vec(b: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(b)
}

/// Reads the NF4 tensor stored under `name` (see the module docs for the keys).
pub fn decode(st: &SafeTensors<'_>, file: &Path, name: &str) -> Result<Nf4Tensor> {
    if st.tensor(&format!("{name}{FP4_STATE_SUFFIX}")).is_ok() {
        return Err(fmt_err(
            file,
            format!("{name} is FP4; only NF4 is supported"),
        ));
    }
    let state_key = format!("{name}{QUANT_STATE_SUFFIX}");
    let state = st
        .tensor(&state_key)
        .map_err(|_| fmt_err(file, format!("missing tensor {state_key}")))?;
    let qs: QuantStateJson = serde_json::from_slice(state.data()).map_err(|e| {
        fmt_err(
            file,
            format!("{state_key}: not a bitsandbytes quant state ({e})"),
        )
    })?;
    if qs.quant_type != "nf4" {
        return Err(fmt_err(
            file,
            format!(
                "{name}: quant_type {:?} is not supported (nf4 only)",
                qs.quant_type
            ),
        ));
    }
    let dtype = DType::parse(&qs.dtype)
        .ok_or_else(|| fmt_err(file, format!("{name}: unknown dtype {:?}", qs.dtype)))?;
    super::check_blocksize("bitsandbytes quant state", qs.blocksize)
        .map_err(|e| fmt_err(file, format!("{name}: {e}")))?;
    let n = qs
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| {
            fmt_err(
                file,
                format!("{state_key}: shape {:?} is too large", qs.shape),
            )
        })?;
    let nb = num_blocks(n, qs.blocksize);
    let packed = tensor(st, file, name, Dtype::U8, packed_len(n))?
        .data()
        .to_vec();
    let quant_map = f32_vec(tensor(st, file, &format!("{name}.quant_map"), Dtype::F32, 16)?.data());
    if quant_map
        .iter()
        .zip(&NF4_LEVELS)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(fmt_err(
            file,
            format!("{name}.quant_map is not the NF4 table"),
        ));
    }
    let absmax_key = format!("{name}.absmax");
    let absmax = st
        .tensor(&absmax_key)
        .map_err(|_| fmt_err(file, format!("missing tensor {absmax_key}")))?;
    let scales = match absmax.dtype() {
        Dtype::F32 => Scales::Absmax(f32_vec(
            tensor(st, file, &absmax_key, Dtype::F32, nb)?.data(),
        )),
        Dtype::U8 => {
            let codes = tensor(st, file, &absmax_key, Dtype::U8, nb)?
                .data()
                .to_vec();
            let nbs = qs.nested_blocksize.unwrap_or(DQ_BLOCKSIZE);
            if nbs != DQ_BLOCKSIZE {
                return Err(fmt_err(
                    file,
                    format!("{name}: nested_blocksize {nbs} (only 256 is supported)"),
                ));
            }
            let offset = qs.nested_offset.ok_or_else(|| {
                fmt_err(file, format!("{state_key}: u8 absmax but no nested_offset"))
            })?;
            let nested_absmax = f32_vec(
                tensor(
                    st,
                    file,
                    &format!("{name}.nested_absmax"),
                    Dtype::F32,
                    nb.div_ceil(DQ_BLOCKSIZE),
                )?
                .data(),
            );
            let m = f32_vec(
                tensor(
                    st,
                    file,
                    &format!("{name}.nested_quant_map"),
                    Dtype::F32,
                    256,
                )?
                .data(),
            );
            let mut map = Box::new([0f32; 256]);
            map.copy_from_slice(&m);
            Scales::Double(DoubleQuant {
                codes,
                nested_absmax,
                offset: offset as f32,
                map,
            })
        }
        other => {
            return Err(fmt_err(
                file,
                format!("{absmax_key}: dtype {other:?} (expected F32 or U8)"),
            ));
        }
    };
    Ok(Nf4Tensor {
        shape: qs.shape,
        dtype,
        blocksize: qs.blocksize,
        packed,
        scales,
    })
}

impl safetensors::View for &OnDiskTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_of_floats() {
        assert_eq!(
            python_float_repr(0.12834592163562775),
            "0.12834592163562775"
        );
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(-2.5), "-2.5");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(123456.0), "123456.0");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1.25e22), "1.25e+22");
        assert_eq!(python_float_repr(f64::from(0.1f32)), "0.10000000149011612");
    }
}
