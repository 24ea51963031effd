//! qadapt's integration tests, one binary (one link of the crate instead of one per file). Most
//! GPU tests compare a kernel with its CPU reference on awkward shapes; they are
//! `#[ignore = "needs a CUDA device"]`, run by `just test-vgpu` on the virtual device and by the
//! GPU bundle, and fail loudly without a device. `common` holds the device and [`test_device!`].

mod common;

mod blas_cuda;
mod flash_attention;
mod kernel_emu;
mod lora;
mod model_ops_cuda;
mod nf4_cuda;
mod optim_cuda;
