//! Element types of float tensors, and the trait that lets one generic op serve f32, bf16 and f16.

use half::{bf16, f16};

/// The float element types qadapt reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE binary16.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The name torch and bitsandbytes use (`"float32"`, `"bfloat16"`, `"float16"`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Parses a torch name (with or without `torch.`) or a short name (`f32`, `bf16`, `f16`).
    pub fn parse(s: &str) -> Option<DType> {
        match s.trim_start_matches("torch.") {
            "float32" | "f32" | "float" => Some(DType::F32),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "f16" | "half" => Some(DType::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

/// A float element type with an f32 view. `round` is f32 -> Self -> f32 (round to nearest even).
pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Rounding (to nearest even) from f32.
    fn from_f32(v: f32) -> Self;
    /// `v` rounded to this type's precision, as f32.
    #[inline]
    fn round(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Float for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// An owned host vector of one of the float types.
#[derive(Debug, Clone, PartialEq)]
pub enum FloatVec {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
}

impl FloatVec {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            FloatVec::F32(_) => DType::F32,
            FloatVec::BF16(_) => DType::BF16,
            FloatVec::F16(_) => DType::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            FloatVec::F32(v) => v.len(),
            FloatVec::BF16(v) => v.len(),
            FloatVec::F16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes, as safetensors stores them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            FloatVec::F32(v) => bytemuck::cast_slice(v),
            FloatVec::BF16(v) => bytemuck::cast_slice(v),
            FloatVec::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Reads little-endian bytes of `dtype` (any alignment).
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Option<FloatVec> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return None;
        }
        Some(match dtype {
            DType::F32 => FloatVec::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => FloatVec::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => FloatVec::F16(bytemuck::pod_collect_to_vec(bytes)),
        })
    }

    /// The first NaN or infinite element, as (index, value), if any.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        fn find<T: Copy>(v: &[T], f32_of: impl Fn(T) -> f32) -> Option<(usize, f32)> {
            v.iter()
                .map(|&x| f32_of(x))
                .enumerate()
                .find(|(_, x)| !x.is_finite())
        }
        match self {
            FloatVec::F32(v) => find(v, |x| x),
            FloatVec::BF16(v) => find(v, bf16::to_f32),
            FloatVec::F16(v) => find(v, f16::to_f32),
        }
    }

    /// Widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            FloatVec::F32(v) => v.clone(),
            FloatVec::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            FloatVec::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// Runs `$body` with `$v` bound to the typed slice inside a [`FloatVec`] (generic dispatch).
#[macro_export]
macro_rules! with_float_vec {
    ($fv:expr, $v:ident => $body:expr) => {
        match $fv {
            $crate::FloatVec::F32($v) => $body,
            $crate::FloatVec::BF16($v) => $body,
            $crate::FloatVec::F16($v) => $body,
        }
    };
}
