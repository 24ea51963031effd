//! qadapt: quantized-adapter ops with a CPU reference and a CUDA path.
//!
//! Every op runs on a [`Device`]: the CPU (always available, all cores) or a CUDA device (when
//! the kernels were compiled by nvcc at build time and a driver and GPU are present). Shapes are
//! checked before anything runs and every failure is a typed [`Error`]; asking for CUDA on a
//! machine without it returns [`Error::CudaNotCompiled`] or [`Error::NoDevice`], never a panic.
//!
//! ```
//! use qadapt::{Device, FloatVec, nf4::{Nf4Tensor, Statistics}};
//! let w: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = Nf4Tensor::quantize(&Device::Cpu, &FloatVec::F32(w.clone()), &[10, 100], 64, Statistics::DoubleQuant)?;
//! assert_eq!(q.packed.len(), 500);
//! let back = q.dequantize(&Device::Cpu, qadapt::DType::F32)?.to_f32_vec();
//! let worst = w.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
//! assert!(worst < 0.2);
//! # Ok::<(), qadapt::Error>(())
//! ```

pub mod bottleneck;
pub mod cpu_features;
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod lora;
pub mod nf4;
pub mod ops;
pub mod optim;
pub mod plan;

pub use cuda::CudaDevice;
pub use device::Device;
pub use dtype::{DType, Float, FloatVec};
pub use error::{Error, Result};
