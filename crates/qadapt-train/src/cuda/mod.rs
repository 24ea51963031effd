//! The CUDA [`Backend`](crate::backend::Backend): [`crate::backend::LoraModel`]'s ops on a CUDA
//! device through qadapt's kernels (needs a GPU, or the virtual device, at run time); and
//! [`CudaGenerator`], incremental decoding with the KV cache on the device.

mod device;
mod generate;

pub use device::{CudaBackend, CudaMoments, CudaProj};
pub use generate::{CudaGenerator, CudaKvCache};
