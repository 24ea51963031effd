//! The CUDA [`Backend`](crate::backend::Backend): [`crate::backend::LoraModel`]'s ops on a CUDA
//! device through qadapt's kernels (needs a GPU, or the virtual device, at run time).

mod device;

pub use device::{CudaBackend, CudaMoments, CudaProj};
