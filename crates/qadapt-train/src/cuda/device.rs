//! [`Backend`] on a CUDA device: `qadapt::cuda::ops` for the model ops, cuBLAS
//! ([`CudaDevice::gemm_bf16`]) for the head and frozen dense projections, the fused
//! [`CudaLoraLinear`] for adapted projections (dense or NF4 base, the NF4 codes dequantized
//! inside the matmul) and for frozen NF4 ones, and `qadapt::optim`'s AdamW kernels (moments in
//! device or managed memory) for the step. All work is queued on the device's one stream; only
//! the loss, the gradient norm and downloads synchronize.
//!
//! Two compositions stand in for kernels that do not exist:
//! - `dst += src` (residual adds, summed input gradients) is a cuBLAS GEMM with k = 1:
//!   `dst [1, len] = 1 · ones [1, 1] · src [1, len] + 1 · dst`, f32 compute, one bf16 rounding.
//! - a frozen NF4 projection is a [`CudaLoraLinear`] (with a zero rank-1 adapter it never uses)
//!   run through its base-only calls, so the fused dequantizing GEMM runs without any LoRA
//!   kernel; an adapted projection asked for no LoRA term takes the same calls.

use half::bf16;
use qadapt::Result;
use qadapt::cuda::ops::{self, AttentionKernels, CudaRopeTable, CudaSegments};
use qadapt::cuda::{CudaDevice, DeviceBuffer, Op};
use qadapt::lora::{
    AdapterStack, BaseWeight, CudaBaseWeight, CudaLoraLinear, LoraBackTerm, LoraLinear, LoraTerm,
};
use qadapt::nf4::{CudaNf4, Statistics};
use qadapt::ops::Accumulate;
use qadapt::ops::attention::AttentionShape;
use qadapt::ops::cross_entropy::{LmHeadShape, RowScore};
use qadapt::ops::dropout::{DropoutMask, MaskCoef};
use qadapt::ops::rope::{RopeDirection, RopeTable};
use qadapt::optim::{
    AdamWStep, PagedAdamState, adamw_cuda, adamw_cuda_paged, sum_squares_cuda_all,
};

use crate::backend::{BackTerms, Backend, BaseRef, LoraMatrix, LoraRef, MomentPlacement, Terms};
use crate::{invalid, shape_err};

/// The CUDA backend: one device and a bf16 1 (the `ones` of the add).
#[derive(Debug)]
pub struct CudaBackend {
    dev: CudaDevice,
    one: DeviceBuffer<bf16>,
}

impl CudaBackend {
    /// The backend on `dev`.
    pub fn new(dev: CudaDevice) -> Result<Self> {
        let one = dev.upload(&[bf16::ONE])?;
        Ok(CudaBackend { dev, one })
    }

    /// Opens device `ordinal`: [`qadapt::Error::CudaNotCompiled`] or [`qadapt::Error::NoDevice`]
    /// where there is none.
    pub fn open(ordinal: usize) -> Result<Self> {
        Self::new(CudaDevice::new(ordinal)?)
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }
}

/// The `beta` of a cuBLAS GEMM that overwrites or accumulates.
fn beta(acc: Accumulate) -> f32 {
    match acc {
        Accumulate::Overwrite => 0.0,
        Accumulate::Add => 1.0,
    }
}

/// A projection on the device.
#[derive(Debug)]
pub enum CudaProj {
    /// A frozen bf16 weight `[out, inp]`, multiplied by cuBLAS.
    Dense {
        /// Output features.
        out: usize,
        /// Input features.
        inp: usize,
        /// The weight.
        w: DeviceBuffer<bf16>,
    },
    /// The fused LoRA layer; `adapted == false` is a frozen NF4 weight run with adapter index -1.
    Fused {
        /// Output features.
        out: usize,
        /// Input features.
        inp: usize,
        /// The layer (base weight and adapter stack of one adapter).
        layer: Box<CudaLoraLinear>,
        /// Rank of the stack.
        rank: usize,
        /// Whether the adapter is real (trainable) or the rank-1 placeholder.
        adapted: bool,
    },
}

/// AdamW moments on the device.
#[derive(Debug)]
pub enum CudaMoments {
    /// `(m, v)` in device memory.
    Device(DeviceBuffer<f32>, DeviceBuffer<f32>),
    /// In managed memory, prefetched to the device by each step.
    Paged(PagedAdamState),
}

/// The fused layer's adapter stack for `lora`: its bf16 pair, or a rank-1 zero placeholder for a
/// frozen projection (the kernel runs it as adapter index -1); with its rank and whether it
/// trains.
fn adapter_stack(
    inp: usize,
    out: usize,
    lora: Option<LoraRef<'_>>,
) -> Result<(AdapterStack, usize, bool)> {
    Ok(match lora {
        Some(l) => (
            AdapterStack::new(l.rank, to_bf16(l.a), to_bf16(l.b), vec![l.scale])?,
            l.rank,
            true,
        ),
        None => (
            AdapterStack::new(1, vec![bf16::ZERO; inp], vec![bf16::ZERO; out], vec![0.0])?,
            1,
            false,
        ),
    })
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

impl Backend for CudaBackend {
    type Act = DeviceBuffer<bf16>;
    type F32 = DeviceBuffer<f32>;
    type Rope = CudaRopeTable;
    type Segments = CudaSegments;
    type Proj = CudaProj;
    type Moments = CudaMoments;

    fn describe(&self) -> String {
        self.dev.describe()
    }

    fn zeros(&self, len: usize) -> Result<Self::Act> {
        self.dev.zeros(len)
    }

    fn zeros_f32(&self, len: usize) -> Result<Self::F32> {
        self.dev.zeros(len)
    }

    fn upload(&self, host: &[f32]) -> Result<Self::Act> {
        self.dev.upload(&to_bf16(host))
    }

    fn upload_f32(&self, host: &[f32]) -> Result<Self::F32> {
        self.dev.upload(host)
    }

    fn download(&self, x: &Self::Act) -> Result<Vec<f32>> {
        Ok(self
            .dev
            .download(x)?
            .into_iter()
            .map(|v| v.to_f32())
            .collect())
    }

    fn download_f32(&self, x: &Self::F32) -> Result<Vec<f32>> {
        self.dev.download(x)
    }

    fn duplicate(&self, x: &Self::Act) -> Result<Self::Act> {
        let mut y = self.dev.zeros(x.len())?;
        self.dev.copy(x, &mut y)?;
        Ok(y)
    }

    fn add_assign(&self, dst: &mut Self::Act, src: &Self::Act) -> Result<()> {
        if dst.len() != src.len() {
            return Err(shape_err("add (cuda)", dst.len(), src.len()));
        }
        self.dev.gemm_bf16(
            &self.one,
            Op::N,
            src,
            Op::N,
            dst,
            (1, src.len(), 1),
            1.0,
            1.0,
        )
    }

    fn rope(&self, table: &RopeTable<f32>) -> Result<Self::Rope> {
        CudaRopeTable::new(&self.dev, table)
    }

    fn segments(&self, batch: usize, seq: usize, starts: &[u32]) -> Result<CudaSegments> {
        CudaSegments::new(&self.dev, batch, seq, starts)
    }

    fn rope_apply(
        &self,
        rope: &Self::Rope,
        x: &mut Self::Act,
        heads: usize,
        dir: RopeDirection,
    ) -> Result<()> {
        rope.apply(&self.dev, x, heads, dir)
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: &Self::Act,
        vocab: usize,
        dim: usize,
        out: &mut Self::Act,
    ) -> Result<()> {
        ops::embedding_forward(&self.dev, ids, table, vocab, dim, out)
    }

    fn rmsnorm_forward(
        &self,
        x: &Self::Act,
        w: &Self::Act,
        eps: f64,
        y: &mut Self::Act,
        rstd: &mut Self::F32,
    ) -> Result<()> {
        ops::rmsnorm_forward(&self.dev, x, w, eps, y, rstd)
    }

    fn rmsnorm_backward(
        &self,
        x: &Self::Act,
        w: &Self::Act,
        rstd: &Self::F32,
        dy: &Self::Act,
        dx: &mut Self::Act,
        acc: Accumulate,
        dw: &mut Self::F32,
    ) -> Result<()> {
        ops::rmsnorm_backward(&self.dev, x, w, rstd, dy, dx, acc, dw)
    }

    fn swiglu_forward(&self, gate: &Self::Act, up: &Self::Act, h: &mut Self::Act) -> Result<()> {
        ops::swiglu_forward(&self.dev, gate, up, h)
    }

    fn swiglu_backward(
        &self,
        gate: &Self::Act,
        up: &Self::Act,
        dh: &Self::Act,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
    ) -> Result<()> {
        ops::swiglu_backward(&self.dev, gate, up, dh, dgate, dup)
    }

    /// `lse [batch, heads, seq]`, whichever kernels run: the tensor-core ones
    /// (`AttentionKernels::for_shape`) for the head sizes they support, the scalar ones otherwise.
    fn attention_saved_len(&self, sh: AttentionShape) -> usize {
        sh.batch * sh.heads * sh.seq
    }

    fn attention_forward(
        &self,
        sh: AttentionShape,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        segments: Option<&CudaSegments>,
        saved: &mut Self::F32,
        out: &mut Self::Act,
    ) -> Result<()> {
        let kernels = AttentionKernels::for_shape(&sh);
        ops::attention_forward(&self.dev, kernels, sh, q, k, v, segments, saved, out)
    }

    fn attention_backward(
        &self,
        sh: AttentionShape,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        segments: Option<&CudaSegments>,
        saved: &Self::F32,
        out: &Self::Act,
        dout: &Self::Act,
        dq: &mut Self::Act,
        dk: &mut Self::Act,
        dv: &mut Self::Act,
    ) -> Result<()> {
        let (dev, kernels, out) = (&self.dev, AttentionKernels::for_shape(&sh), Some(out));
        ops::attention_backward(
            dev, kernels, sh, q, k, v, segments, out, saved, dout, dq, dk, dv,
        )
    }

    fn matmul_wt(
        &self,
        x: &Self::Act,
        w: &Self::Act,
        (rows, inp, out): (usize, usize, usize),
        y: &mut Self::Act,
    ) -> Result<()> {
        self.dev
            .gemm_bf16(x, Op::N, w, Op::T, y, (rows, out, inp), 1.0, 0.0)
    }

    fn proj(
        &self,
        out: usize,
        inp: usize,
        base: BaseRef<'_>,
        lora: Option<LoraRef<'_>>,
    ) -> Result<Self::Proj> {
        let weight = match (base, &lora) {
            (BaseRef::Dense(w), None) => {
                if w.len() != out * inp {
                    return Err(shape_err(
                        "projection (cuda)",
                        format!("W of {out}x{inp}"),
                        w.len(),
                    ));
                }
                return Ok(CudaProj::Dense {
                    out,
                    inp,
                    w: self.upload(w)?,
                });
            }
            (BaseRef::Dense(w), Some(_)) => BaseWeight::Dense(to_bf16(w)),
            (BaseRef::Nf4(t), _) => BaseWeight::Nf4(t.clone()),
            (BaseRef::QuantizeNf4(w), _) => {
                if w.len() != out * inp {
                    return Err(shape_err(
                        "projection (cuda)",
                        format!("W of {out}x{inp}"),
                        w.len(),
                    ));
                }
                // The f32 values cross once; the codes are made on the device, and the f32 copy
                // is freed when this returns.
                let dense = self.dev.upload(w)?;
                let q = CudaNf4::quantize(
                    &self.dev,
                    &dense,
                    qadapt::nf4::DEFAULT_BLOCKSIZE,
                    Statistics::DoubleQuant,
                )?;
                drop(dense);
                let (adapters, rank, adapted) = adapter_stack(inp, out, lora)?;
                let layer = CudaLoraLinear::from_device(
                    &self.dev,
                    out,
                    inp,
                    CudaBaseWeight::Nf4(q),
                    &adapters,
                )?;
                return Ok(CudaProj::Fused {
                    out,
                    inp,
                    layer: Box::new(layer),
                    rank,
                    adapted,
                });
            }
        };
        let (adapters, rank, adapted) = adapter_stack(inp, out, lora)?;
        let host = LoraLinear::new(out, inp, weight, None, adapters)?;
        Ok(CudaProj::Fused {
            out,
            inp,
            layer: Box::new(CudaLoraLinear::upload(&self.dev, &host)?),
            rank,
            adapted,
        })
    }

    fn proj_forward(
        &self,
        p: &Self::Proj,
        x: &Self::Act,
        rows: usize,
        y: &mut Self::Act,
        acc: Accumulate,
        terms: Terms<'_, Self::Act>,
    ) -> Result<()> {
        // Every row adapted (no index buffer) with the LoRA term, else the base only; a
        // residual add (`acc`) happens in the kernels' epilogue.
        match p {
            CudaProj::Dense { out, inp, w } => {
                self.dev
                    .gemm_bf16(x, Op::N, w, Op::T, y, (rows, *out, *inp), 1.0, beta(acc))
            }
            CudaProj::Fused { layer, adapted, .. } => {
                let term = match terms {
                    Terms::Adapted { keep } if *adapted => LoraTerm::Adapted {
                        adapter_idx: None,
                        keep,
                    },
                    _ => LoraTerm::Base,
                };
                layer.forward(x, rows, y, acc, term)
            }
        }
    }

    fn proj_backward(
        &self,
        p: &Self::Proj,
        x: &Self::Act,
        dy: &Self::Act,
        rows: usize,
        dx: &mut Self::Act,
        acc: Accumulate,
        terms: BackTerms<'_, Self::Act, Self::F32>,
    ) -> Result<()> {
        const OP: &str = "projection backward (cuda)";
        let (lora, kept, grads) = match terms {
            BackTerms::Base => (false, None, None),
            BackTerms::Adapted { kept, grads } => (true, kept, grads),
        };
        match p {
            CudaProj::Dense { out, inp, w } => {
                if grads.is_some() {
                    return Err(invalid(OP, "gradients asked of a projection without LoRA"));
                }
                self.dev
                    .gemm_bf16(dy, Op::N, w, Op::N, dx, (rows, *inp, *out), 1.0, beta(acc))
            }
            CudaProj::Fused {
                out,
                inp,
                layer,
                rank,
                adapted,
            } => {
                if grads.is_some() && !(*adapted && lora) {
                    return Err(invalid(OP, "gradients asked without the LoRA term"));
                }
                // With the LoRA term: the full backward (gradients into `grads`, or into
                // scratch when the caller wants none); without: the dx GEMM only.
                let (mut sa, mut sb);
                let grads = match grads {
                    Some(g) => Some(g),
                    None if *adapted && lora => {
                        sa = self.dev.zeros::<f32>(rank * inp)?;
                        sb = self.dev.zeros::<f32>(out * rank)?;
                        Some((&mut sa, &mut sb))
                    }
                    None => None,
                };
                // A sum of input gradients (`acc`) happens in the kernels' epilogue.
                let term = match grads {
                    Some(grads) => LoraBackTerm::Adapted {
                        adapter_idx: None,
                        kept,
                        grads,
                    },
                    None => LoraBackTerm::Base,
                };
                layer.backward(x, dy, rows, dx, acc, term)
            }
        }
    }

    fn proj_keep_len(&self, p: &Self::Proj, rows: usize) -> usize {
        match p {
            CudaProj::Fused {
                layer,
                adapted: true,
                ..
            } => layer.kept_len(rows),
            _ => 0,
        }
    }

    fn lm_head_cross_entropy(
        &self,
        xn: &Self::Act,
        head: &Self::Act,
        shape: LmHeadShape,
        targets: &[Option<u32>],
        chunk_rows: usize,
        dloss: f32,
        dxn: Option<&mut Self::Act>,
    ) -> Result<f32> {
        ops::lm_head_cross_entropy(&self.dev, xn, head, shape, targets, chunk_rows, dloss, dxn)
    }

    fn lm_head_scores(
        &self,
        xn: &Self::Act,
        head: &Self::Act,
        shape: LmHeadShape,
        targets: &[Option<u32>],
        chunk_rows: usize,
    ) -> Result<Vec<RowScore<f32>>> {
        ops::lm_head_scores(&self.dev, xn, head, shape, targets, chunk_rows)
    }

    fn sum_squares(&self, xs: &[&Self::F32]) -> Result<f64> {
        sum_squares_cuda_all(&self.dev, xs)
    }

    fn moments(&self, len: usize, placement: MomentPlacement) -> Result<Self::Moments> {
        Ok(match placement {
            MomentPlacement::Device => {
                CudaMoments::Device(self.dev.zeros(len)?, self.dev.zeros(len)?)
            }
            MomentPlacement::Paged => CudaMoments::Paged(PagedAdamState::new(&self.dev, len)?),
        })
    }

    fn mask_mix(
        &self,
        mask: DropoutMask,
        a: &Self::Act,
        ca: MaskCoef,
        b: Option<(&Self::Act, MaskCoef)>,
        out: &mut Self::Act,
    ) -> Result<()> {
        ops::mask_mix(&self.dev, mask, a, ca, b, out)
    }

    fn moments_from(
        &self,
        m: &[f32],
        v: &[f32],
        placement: MomentPlacement,
    ) -> Result<Self::Moments> {
        if m.len() != v.len() {
            return Err(shape_err("adam moments (cuda)", m.len(), v.len()));
        }
        Ok(match placement {
            MomentPlacement::Device => {
                CudaMoments::Device(self.dev.upload(m)?, self.dev.upload(v)?)
            }
            MomentPlacement::Paged => {
                CudaMoments::Paged(PagedAdamState::from_host(&self.dev, m, v)?)
            }
        })
    }

    fn download_moments(&self, state: &Self::Moments) -> Result<(Vec<f32>, Vec<f32>)> {
        match state {
            CudaMoments::Device(m, v) => Ok((self.dev.download(m)?, self.dev.download(v)?)),
            CudaMoments::Paged(s) => s.to_host(&self.dev),
        }
    }

    fn adamw(
        &self,
        param: &mut Self::F32,
        proj: &mut Self::Proj,
        which: LoraMatrix,
        grad: &Self::F32,
        state: &mut Self::Moments,
        step: &AdamWStep,
    ) -> Result<()> {
        let CudaProj::Fused {
            layer,
            adapted: true,
            ..
        } = proj
        else {
            return Err(invalid("adamw (cuda)", "the projection has no LoRA pair"));
        };
        let (a, b) = layer.adapters_mut();
        let working = match which {
            LoraMatrix::A => a,
            LoraMatrix::B => b,
        };
        match state {
            CudaMoments::Device(m, v) => {
                adamw_cuda(&self.dev, param, Some(working), grad, m, v, step)
            }
            CudaMoments::Paged(s) => {
                adamw_cuda_paged(&self.dev, param, Some(working), grad, s, step)
            }
        }
    }
}
