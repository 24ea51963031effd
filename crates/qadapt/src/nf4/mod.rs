//! NF4: 4-bit NormalFloat blockwise quantization, bit-compatible with bitsandbytes
//! (docs/design-notes.md).
//!
//! A tensor of `n` elements, flattened, is cut into blocks of `blocksize` (32..=4096, a power of
//! two). Each block keeps its absmax (f32) and one 4-bit code per element: the nearest of the 16
//! [`NF4_LEVELS`] to `x * (1/absmax)`, ties to the lower code. Two codes share a byte, element
//! `2j` in the high nibble. With [`Statistics::DoubleQuant`] the absmax values are themselves
//! quantized: `offset` = their mean, and blocks of 256 values `absmax - offset` are coded with
//! the signed 8-bit [`dynamic_map::DQ_MAP`] plus one f32 per 256.
//!
//! [`Nf4Tensor`] holds the result on the host; [`cpu`] is the reference of every kernel, and
//! [`CudaNf4`] the same data resident on a CUDA device. [`bnb`] reads and writes the on-disk
//! layout that transformers + bitsandbytes use.

pub mod bnb;
pub mod cpu;
pub mod dynamic_map;

use cudarc::driver::CudaSlice;

use crate::cuda::CudaDevice;
use crate::cuda::launch::{self, CudaScalesRef};
use crate::device::Device;
use crate::dtype::{DType, Float, FloatVec};
use crate::error::{Result, invalid, shape_err};
use crate::with_float_vec;
use qadapt_kernels::ffi;

/// The 16 NF4 levels, index = 4-bit code (bitsandbytes' `quant_map`).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Default block size (bitsandbytes' and transformers' default).
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// Block size of double quantization.
pub const DQ_BLOCKSIZE: usize = ffi::QADAPT_DQ_BLOCK as usize;

/// Checks that `bs` is a power of two in 32..=4096.
pub fn check_blocksize(op: &'static str, bs: usize) -> Result<()> {
    let (lo, hi) = (
        ffi::QADAPT_NF4_MIN_BLOCK as usize,
        ffi::QADAPT_NF4_MAX_BLOCK as usize,
    );
    if !bs.is_power_of_two() || !(lo..=hi).contains(&bs) {
        return Err(invalid(
            op,
            format!("block size {bs} is not a power of two in {lo}..={hi}"),
        ));
    }
    Ok(())
}

/// Number of NF4 blocks of `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Bytes of packed codes for `n` elements.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// How block absmax values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Statistics {
    /// One f32 per block.
    #[default]
    Plain,
    /// Double quantization: one u8 per block, one f32 per 256 blocks, one f32 offset.
    DoubleQuant,
}

/// Double-quantized block scales.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One code per NF4 block into `map`.
    pub codes: Vec<u8>,
    /// One f32 per [`DQ_BLOCKSIZE`] NF4 blocks.
    pub nested_absmax: Vec<f32>,
    /// Mean of the original absmax.
    pub offset: f32,
    /// The code book (`nested_quant_map`), sorted ascending.
    pub map: Box<[f32; 256]>,
}

/// Per-block scales of an NF4 tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// One f32 absmax per block.
    Absmax(Vec<f32>),
    /// Double quantization.
    Double(DoubleQuant),
}

impl Scales {
    /// Borrowed view for the CPU reference.
    pub fn as_ref(&self) -> cpu::ScalesRef<'_> {
        match self {
            Scales::Absmax(a) => cpu::ScalesRef::Absmax(a),
            Scales::Double(d) => cpu::ScalesRef::Double {
                codes: &d.codes,
                nested_absmax: &d.nested_absmax,
                map: &d.map,
                offset: d.offset,
            },
        }
    }

    /// Which kind of statistics these are.
    pub fn statistics(&self) -> Statistics {
        match self {
            Scales::Absmax(_) => Statistics::Plain,
            Scales::Double(_) => Statistics::DoubleQuant,
        }
    }
}

/// An NF4-quantized tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    /// Element type of the original tensor (what dequantization gives back by default).
    pub dtype: DType,
    /// Elements per block.
    pub blocksize: usize,
    /// `ceil(n/2)` bytes, element `2j` in the high nibble of byte `j`.
    pub packed: Vec<u8>,
    /// Block scales.
    pub scales: Scales,
}

impl Nf4Tensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks the internal lengths against the shape and block size.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "nf4 tensor";
        check_blocksize(OP, self.blocksize)?;
        let n = self.numel();
        if self.packed.len() != packed_len(n) {
            return Err(shape_err(
                OP,
                format!("{} packed bytes for shape {:?}", packed_len(n), self.shape),
                self.packed.len(),
            ));
        }
        let nb = num_blocks(n, self.blocksize);
        match &self.scales {
            Scales::Absmax(a) if a.len() != nb => {
                Err(shape_err(OP, format!("{nb} absmax"), a.len()))
            }
            Scales::Double(d)
                if d.codes.len() != nb || d.nested_absmax.len() != nb.div_ceil(DQ_BLOCKSIZE) =>
            {
                Err(shape_err(
                    OP,
                    format!(
                        "{nb} absmax codes and {} nested absmax",
                        nb.div_ceil(DQ_BLOCKSIZE)
                    ),
                    format!("{} and {}", d.codes.len(), d.nested_absmax.len()),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Quantizes `input` (of `shape`) on `device`.
    pub fn quantize(
        device: &Device,
        input: &FloatVec,
        shape: &[usize],
        blocksize: usize,
        statistics: Statistics,
    ) -> Result<Nf4Tensor> {
        const OP: &str = "nf4 quantize";
        check_blocksize(OP, blocksize)?;
        let n: usize = shape.iter().product();
        if input.len() != n {
            return Err(shape_err(
                OP,
                format!("{n} elements for shape {shape:?}"),
                input.len(),
            ));
        }
        let (packed, scales) = match device {
            Device::Cpu => {
                let mut packed = vec![0u8; packed_len(n)];
                let mut absmax = vec![0f32; num_blocks(n, blocksize)];
                with_float_vec!(input, v => cpu::quantize(v, blocksize, &mut packed, &mut absmax))?;
                let scales = match statistics {
                    Statistics::Plain => Scales::Absmax(absmax),
                    Statistics::DoubleQuant => Scales::Double(double_quant_cpu(&absmax)?),
                };
                (packed, scales)
            }
            Device::Cuda(dev) if n > 0 => {
                let q = with_float_vec!(input, v => CudaNf4::quantize(dev, &dev.upload(v)?, blocksize, statistics))?;
                q.to_host(dev)?
            }
            Device::Cuda(_) => (Vec::new(), empty_scales(statistics)),
        };
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            dtype: input.dtype(),
            blocksize,
            packed,
            scales,
        })
    }

    /// Dequantizes to `dtype` on `device`.
    pub fn dequantize(&self, device: &Device, dtype: DType) -> Result<FloatVec> {
        self.validate()?;
        let n = self.numel();
        match device {
            Device::Cpu => Ok(match dtype {
                DType::F32 => FloatVec::F32(self.dequantize_cpu(n)?),
                DType::BF16 => FloatVec::BF16(self.dequantize_cpu(n)?),
                DType::F16 => FloatVec::F16(self.dequantize_cpu(n)?),
            }),
            Device::Cuda(_) if n == 0 => {
                Ok(FloatVec::from_bytes(dtype, &[]).unwrap_or(FloatVec::F32(Vec::new())))
            }
            Device::Cuda(dev) => {
                let q = CudaNf4::upload(dev, self)?;
                Ok(match dtype {
                    DType::F32 => FloatVec::F32(dev.download(&q.dequantize(dev)?)?),
                    DType::BF16 => FloatVec::BF16(dev.download(&q.dequantize(dev)?)?),
                    DType::F16 => FloatVec::F16(dev.download(&q.dequantize(dev)?)?),
                })
            }
        }
    }

    fn dequantize_cpu<T: Float>(&self, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        cpu::dequantize(&self.packed, self.scales.as_ref(), self.blocksize, &mut out)?;
        Ok(out)
    }
}

fn empty_scales(statistics: Statistics) -> Scales {
    match statistics {
        Statistics::Plain => Scales::Absmax(Vec::new()),
        Statistics::DoubleQuant => Scales::Double(DoubleQuant {
            codes: Vec::new(),
            nested_absmax: Vec::new(),
            offset: 0.0,
            map: Box::new(dynamic_map::DQ_MAP),
        }),
    }
}

/// Double quantization of `absmax` on the CPU with bitsandbytes' map.
pub fn double_quant_cpu(absmax: &[f32]) -> Result<DoubleQuant> {
    let map = Box::new(dynamic_map::DQ_MAP);
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = vec![0f32; absmax.len().div_ceil(DQ_BLOCKSIZE)];
    let offset = cpu::double_quant(absmax, &map, &mut codes, &mut nested_absmax)?;
    Ok(DoubleQuant {
        codes,
        nested_absmax,
        offset,
        map,
    })
}

/// Block scales resident on a CUDA device.
#[derive(Debug)]
pub enum CudaScales {
    /// One f32 absmax per block.
    Absmax(CudaSlice<f32>),
    /// Double quantization.
    Double {
        /// One code per block.
        codes: CudaSlice<u8>,
        /// One f32 per 256 blocks.
        nested_absmax: CudaSlice<f32>,
        /// The 256-entry code book.
        map: CudaSlice<f32>,
        /// Mean of the original absmax.
        offset: f32,
    },
}

/// An NF4 tensor resident on a CUDA device (flattened; the shape stays with the caller).
#[derive(Debug)]
pub struct CudaNf4 {
    /// Number of elements.
    pub n: usize,
    /// Elements per block.
    pub blocksize: usize,
    /// Packed codes.
    pub packed: CudaSlice<u8>,
    /// Block scales.
    pub scales: CudaScales,
}

impl CudaNf4 {
    /// Quantizes a device buffer on the device (no host round trip but the 4-byte offset).
    pub fn quantize<T: Float>(
        dev: &CudaDevice,
        input: &CudaSlice<T>,
        blocksize: usize,
        statistics: Statistics,
    ) -> Result<CudaNf4> {
        let n = input.len();
        check_blocksize("nf4 quantize", blocksize)?;
        let nb = num_blocks(n, blocksize);
        let mut packed = dev.zeros::<u8>(packed_len(n))?;
        let mut absmax = dev.zeros::<f32>(nb)?;
        launch::nf4_quantize(dev, input, blocksize, &mut packed, &mut absmax)?;
        let scales = match statistics {
            Statistics::Plain => CudaScales::Absmax(absmax),
            Statistics::DoubleQuant => {
                let map = dev.upload(&dynamic_map::DQ_MAP)?;
                let mut codes = dev.zeros::<u8>(nb)?;
                let mut nested_absmax = dev.zeros::<f32>(nb.div_ceil(DQ_BLOCKSIZE))?;
                let offset =
                    launch::nf4_double_quant(dev, &absmax, &map, &mut codes, &mut nested_absmax)?;
                CudaScales::Double {
                    codes,
                    nested_absmax,
                    map,
                    offset,
                }
            }
        };
        Ok(CudaNf4 {
            n,
            blocksize,
            packed,
            scales,
        })
    }

    /// Copies a host NF4 tensor to the device.
    pub fn upload(dev: &CudaDevice, t: &Nf4Tensor) -> Result<CudaNf4> {
        t.validate()?;
        let scales = match &t.scales {
            Scales::Absmax(a) => CudaScales::Absmax(dev.upload(a)?),
            Scales::Double(d) => CudaScales::Double {
                codes: dev.upload(&d.codes)?,
                nested_absmax: dev.upload(&d.nested_absmax)?,
                map: dev.upload(&d.map[..])?,
                offset: d.offset,
            },
        };
        Ok(CudaNf4 {
            n: t.numel(),
            blocksize: t.blocksize,
            packed: dev.upload(&t.packed)?,
            scales,
        })
    }

    /// Dequantizes into a new device buffer.
    pub fn dequantize<T: Float>(&self, dev: &CudaDevice) -> Result<CudaSlice<T>> {
        let mut out = dev.zeros::<T>(self.n)?;
        self.dequantize_into(dev, &mut out)?;
        Ok(out)
    }

    /// Dequantizes into `out` (overwritten; `out.len()` must be `n`).
    pub fn dequantize_into<T: Float>(
        &self,
        dev: &CudaDevice,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if out.len() != self.n {
            return Err(shape_err("nf4 dequantize", self.n, out.len()));
        }
        launch::nf4_dequantize(dev, &self.packed, self.scales_ref(), self.blocksize, out)
    }

    /// The scales, borrowed for a launch.
    pub(crate) fn scales_ref(&self) -> CudaScalesRef<'_> {
        match &self.scales {
            CudaScales::Absmax(a) => CudaScalesRef::Absmax(a),
            CudaScales::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => CudaScalesRef::Double {
                codes,
                nested_absmax,
                map,
                offset: *offset,
            },
        }
    }

    /// Copies packed codes and scales back to the host.
    pub fn to_host(&self, dev: &CudaDevice) -> Result<(Vec<u8>, Scales)> {
        let packed = dev.download(&self.packed)?;
        let scales = match &self.scales {
            CudaScales::Absmax(a) => Scales::Absmax(dev.download(a)?),
            CudaScales::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => {
                let m = dev.download(map)?;
                let mut map = Box::new([0f32; 256]);
                map.copy_from_slice(&m);
                Scales::Double(DoubleQuant {
                    codes: dev.download(codes)?,
                    nested_absmax: dev.download(nested_absmax)?,
                    offset: *offset,
                    map,
                })
            }
        };
        Ok((packed, scales))
    }
}
