//! The model's mixed-precision path for LoRA and QLoRA training: forward, hand-written backward
//! and AdamW on a CUDA device over qadapt's kernels (bf16 activations, f32 accumulation, a bf16
//! or NF4 double-quant base, f32 LoRA masters with bf16 working copies, moments on the device or
//! paged), as the QLoRA paper describes it (Dettmers et al. 2023).
//!
//! The orchestration ([`LoraModel`]: layer order, saved activations, backward order, LoRA wiring,
//! GQA, RoPE, tied or untied head, gradient accumulation, clipping, the optimizer step) is
//! written once over [`Backend`], whose methods mirror the signatures of `qadapt::cuda::ops`,
//! `qadapt::lora::CudaLoraLinear`, `CudaDevice::gemm_bf16` and `qadapt::optim`. Two backends:
//! - [`CudaBackend`]: those ops on device buffers (needs a GPU at run time);
//! - [`CpuBackend`]: the CPU references on host vectors, rounding to bf16 where the device stores
//!   bf16 ([`Precision::Bf16`]) or nothing ([`Precision::F32`]).
//!
//! So the orchestration is checked on any machine against the CPU [`crate::Llama`]
//! (`tests/cuda_path.rs`: to f32 rounding with [`Precision::F32`], to bf16 tolerances with
//! [`Precision::Bf16`]), while each device op is checked against its CPU reference by qadapt's
//! own GPU tests; `tests/cuda_path.rs` also runs the CUDA backend against the CPU model
//! (ignored without a GPU).
//!
//! Adapters come from and go back to [`crate::LoraAdapter`] (f32), so loading, initialization and
//! the PEFT writer are the CPU path's.

mod backend;
mod cpu;
mod device;
mod model;

pub use backend::{Backend, BaseRef, LoraMatrix, LoraRef, MomentPlacement};
pub use cpu::{CpuBackend, CpuProj, Precision};
pub use device::{CudaBackend, CudaMoments, CudaProj};
pub use model::{BaseFormat, LoraModel};
