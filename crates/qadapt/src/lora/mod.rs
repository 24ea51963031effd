//! Fused LoRA linear layers: `y = x W^T + bias + s · (x A^T) B^T` over a dense bf16 or an NF4
//! base weight, with several adapters in one batch (each row picks its adapter, or none).
//!
//! Shapes, all row-major: x `[m, k]`, W `[n, k]` (bf16, or NF4 over the flattened W, see
//! [`crate::nf4`]), the adapter stack A `[adapters, rank, k]`, B `[adapters, n, rank]`, one scale
//! per adapter, bias `[n]`, y `[m, n]`. bf16 in and out, f32 accumulation. The LoRA intermediate
//! `u = bf16(s · x A^T)` is rounded to bf16 as a bf16 PEFT forward rounds `lora_A(x)`.
//!
//! [`cpu`] is the reference of every kernel in `kernels/lora_*.cu`; [`LoraLinear`] is the safe
//! layer that runs either on a [`Device`] (uploading per call on CUDA), and [`CudaLoraLinear`] keeps
//! a layer resident on a GPU for repeated forward/backward calls on device buffers. Forward
//! overwrites y; backward overwrites dx and ADDS into the adapter gradients.
//!
//! ```
//! use half::bf16;
//! use qadapt::Device;
//! use qadapt::lora::{AdapterStack, BaseWeight, LoraGrads, LoraLinear};
//!
//! let (n, k, r) = (6, 8, 2);
//! let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32((i as f32 * 0.1).sin())).collect();
//! let a = vec![bf16::from_f32(0.5); r * k];
//! let b = vec![bf16::from_f32(0.25); n * r];
//! let adapters = AdapterStack::new(r, a, b, vec![2.0])?;
//! let layer = LoraLinear::new(n, k, BaseWeight::Dense(w), None, adapters)?;
//!
//! let x = vec![bf16::from_f32(1.0); 3 * k]; // 3 rows
//! let y = layer.forward(&Device::Cpu, &x, 3, None)?;
//! assert_eq!(y.len(), 3 * n);
//! // LoRA term of every output: 2 * (0.5 * 8) * 0.25 * 2 = 4.
//! let base = layer.forward(&Device::Cpu, &x, 3, Some(&[-1, -1, -1]))?;
//! assert!((y[0].to_f32() - base[0].to_f32() - 4.0).abs() < 0.1); // two bf16 roundings of y
//!
//! let mut grads = LoraGrads::zeros(&layer);
//! let dx = layer.backward(&Device::Cpu, &x, &vec![bf16::ONE; 3 * n], 3, None, &mut grads)?;
//! assert_eq!((dx.len(), grads.a.len(), grads.b.len()), (3 * k, r * k, n * r));
//! # Ok::<(), qadapt::Error>(())
//! ```

pub mod cpu;

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::CudaDevice;
use crate::cuda::launch::{self, CudaLoraRef, CudaWeightRef};
use crate::device::Device;
use crate::dtype::FloatVec;
use crate::error::{Result, invalid, shape_err};
use crate::nf4::cpu::ScalesRef;
use crate::nf4::{Nf4Tensor, num_blocks, packed_len};
use crate::ops::Accumulate;

/// The sizes of one fused LoRA call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    /// Rows of x and y.
    pub m: usize,
    /// Output features (rows of W).
    pub n: usize,
    /// Input features (columns of W).
    pub k: usize,
    /// LoRA rank of every adapter in the stack (0: no LoRA term).
    pub rank: usize,
    /// Adapters in the stack.
    pub n_adapters: usize,
}

impl LoraShape {
    /// Columns of the LoRA intermediate `u`: `rank * n_adapters`.
    pub fn r_total(&self) -> usize {
        self.rank * self.n_adapters
    }

    /// Checks every input length against the shape and the adapter indices against the stack.
    pub(crate) fn check(
        &self,
        op: &'static str,
        x: &[bf16],
        w: WeightRef<'_>,
        lora: LoraRef<'_>,
        adapter_idx: Option<&[i32]>,
        bias: Option<&[bf16]>,
    ) -> Result<()> {
        let (m, n, k, r, na) = (self.m, self.n, self.k, self.rank, self.n_adapters);
        if m == 0 || n == 0 || k == 0 {
            return Err(invalid(op, format!("empty shape m={m} n={n} k={k}")));
        }
        if x.len() != m * k {
            return Err(shape_err(op, format!("x of {m}x{k}"), x.len()));
        }
        match w {
            WeightRef::Dense(d) if d.len() != n * k => {
                return Err(shape_err(op, format!("W of {n}x{k}"), d.len()));
            }
            WeightRef::Nf4 {
                packed,
                scales,
                blocksize,
            } => {
                crate::nf4::check_blocksize(op, blocksize)?;
                if packed.len() != packed_len(n * k) {
                    return Err(shape_err(
                        op,
                        format!("{} packed NF4 bytes", packed_len(n * k)),
                        packed.len(),
                    ));
                }
                let nb = num_blocks(n * k, blocksize);
                if scales.len() != nb {
                    return Err(shape_err(
                        op,
                        format!("{nb} NF4 block scales"),
                        scales.len(),
                    ));
                }
            }
            WeightRef::Dense(_) => {}
        }
        if lora.a.len() != na * r * k || lora.b.len() != na * n * r || lora.scales.len() != na {
            return Err(shape_err(
                op,
                format!("A of {na}x{r}x{k}, B of {na}x{n}x{r}, {na} scales"),
                format!("{}, {}, {}", lora.a.len(), lora.b.len(), lora.scales.len()),
            ));
        }
        if let Some(idx) = adapter_idx {
            if idx.len() != m {
                return Err(shape_err(op, format!("{m} adapter indices"), idx.len()));
            }
            if let Some(bad) = idx.iter().find(|&&i| i < -1 || i >= na as i32) {
                return Err(invalid(op, format!("adapter index {bad} outside -1..{na}")));
            }
        } else if na == 0 && r > 0 {
            return Err(invalid(op, "no adapter index given and the stack is empty"));
        }
        if let Some(b) = bias
            && b.len() != n
        {
            return Err(shape_err(op, format!("bias of {n}"), b.len()));
        }
        Ok(())
    }
}

/// The base weight, borrowed: dense bf16 `[n, k]` or NF4 over the flattened `[n, k]`.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    /// bf16, row-major `[n, k]`.
    Dense(&'a [bf16]),
    /// NF4 codes of the flattened `[n, k]` tensor.
    Nf4 {
        /// `ceil(n*k/2)` bytes.
        packed: &'a [u8],
        /// Block scales (plain or double quant).
        scales: ScalesRef<'a>,
        /// Elements per NF4 block.
        blocksize: usize,
    },
}

/// The adapter stack, borrowed: A `[adapters, rank, k]`, B `[adapters, n, rank]`, scales.
#[derive(Debug, Clone, Copy)]
pub struct LoraRef<'a> {
    /// Stacked A matrices.
    pub a: &'a [bf16],
    /// Stacked B matrices.
    pub b: &'a [bf16],
    /// One scale (alpha / rank, or alpha / sqrt(rank) for rsLoRA) per adapter.
    pub scales: &'a [f32],
}

/// The frozen base weight of a [`LoraLinear`].
#[derive(Debug, Clone, PartialEq)]
pub enum BaseWeight {
    /// bf16, row-major `[out_features, in_features]`.
    Dense(Vec<bf16>),
    /// NF4 quantized `[out_features, in_features]`.
    Nf4(Nf4Tensor),
}

impl BaseWeight {
    fn as_ref(&self) -> WeightRef<'_> {
        match self {
            BaseWeight::Dense(w) => WeightRef::Dense(w),
            BaseWeight::Nf4(t) => WeightRef::Nf4 {
                packed: &t.packed,
                scales: t.scales.as_ref(),
                blocksize: t.blocksize,
            },
        }
    }
}

/// Several LoRA adapters of one rank on the same base weight.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterStack {
    /// Rank of every adapter.
    pub rank: usize,
    /// A `[adapters, rank, in_features]`.
    pub a: Vec<bf16>,
    /// B `[adapters, out_features, rank]`.
    pub b: Vec<bf16>,
    /// One scale per adapter.
    pub scales: Vec<f32>,
}

impl AdapterStack {
    /// A stack of `scales.len()` adapters (lengths are checked against the layer by
    /// [`LoraLinear::new`]).
    pub fn new(rank: usize, a: Vec<bf16>, b: Vec<bf16>, scales: Vec<f32>) -> Result<AdapterStack> {
        if rank == 0 || scales.is_empty() {
            return Err(invalid(
                "lora adapters",
                "rank and adapter count must be positive",
            ));
        }
        Ok(AdapterStack { rank, a, b, scales })
    }

    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.scales.len()
    }

    /// Whether the stack holds no adapter.
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    fn as_ref(&self) -> LoraRef<'_> {
        LoraRef {
            a: &self.a,
            b: &self.b,
            scales: &self.scales,
        }
    }
}

/// Gradients of the adapter stack, f32, accumulated by [`LoraLinear::backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrads {
    /// d loss / d A, `[adapters, rank, in_features]`.
    pub a: Vec<f32>,
    /// d loss / d B, `[adapters, out_features, rank]`.
    pub b: Vec<f32>,
}

impl LoraGrads {
    /// Zero gradients shaped like `layer`'s adapters.
    pub fn zeros(layer: &LoraLinear) -> LoraGrads {
        let (r, na) = (layer.adapters.rank, layer.adapters.len());
        LoraGrads {
            a: vec![0.0; na * r * layer.in_features],
            b: vec![0.0; na * layer.out_features * r],
        }
    }
}

/// A linear layer `y = x W^T + bias + s · (x A^T) B^T` with a frozen base weight and a stack of
/// LoRA adapters, runnable on the CPU (reference) or on CUDA (fused kernels).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLinear {
    /// Rows of W.
    pub out_features: usize,
    /// Columns of W.
    pub in_features: usize,
    /// The frozen base weight.
    pub weight: BaseWeight,
    /// Optional bias `[out_features]`.
    pub bias: Option<Vec<bf16>>,
    /// The adapters.
    pub adapters: AdapterStack,
}

impl LoraLinear {
    /// Builds a layer, checking every length.
    pub fn new(
        out_features: usize,
        in_features: usize,
        weight: BaseWeight,
        bias: Option<Vec<bf16>>,
        adapters: AdapterStack,
    ) -> Result<LoraLinear> {
        let layer = LoraLinear {
            out_features,
            in_features,
            weight,
            bias,
            adapters,
        };
        if let BaseWeight::Nf4(t) = &layer.weight {
            t.validate()?;
            if t.numel() != out_features * in_features {
                return Err(shape_err(
                    "lora linear",
                    format!("NF4 weight of {out_features}x{in_features}"),
                    format!("{:?}", t.shape),
                ));
            }
        }
        let x = vec![bf16::ZERO; in_features];
        layer.shape(1).check(
            "lora linear",
            &x,
            layer.weight.as_ref(),
            layer.adapters.as_ref(),
            Some(&[-1]),
            layer.bias.as_deref(),
        )?;
        Ok(layer)
    }

    /// The shape of a call on `rows` rows.
    pub fn shape(&self, rows: usize) -> LoraShape {
        LoraShape {
            m: rows,
            n: self.out_features,
            k: self.in_features,
            rank: self.adapters.rank,
            n_adapters: self.adapters.len(),
        }
    }

    /// `y [rows, out_features]` for `x [rows, in_features]`; `adapter_idx` picks each row's
    /// adapter (-1: base only; `None`: adapter 0 for every row).
    pub fn forward(
        &self,
        device: &Device,
        x: &[bf16],
        rows: usize,
        adapter_idx: Option<&[i32]>,
    ) -> Result<Vec<bf16>> {
        let shape = self.shape(rows);
        let mut y = vec![bf16::ZERO; rows * self.out_features];
        match device {
            Device::Cpu => {
                let mut u = vec![bf16::ZERO; rows * shape.r_total()];
                cpu::forward(
                    &shape,
                    x,
                    self.weight.as_ref(),
                    self.adapters.as_ref(),
                    adapter_idx,
                    self.bias.as_deref(),
                    &mut u,
                    &mut y,
                    Accumulate::Overwrite,
                )?;
            }
            Device::Cuda(dev) => {
                shape.check(
                    "lora forward (cuda)",
                    x,
                    self.weight.as_ref(),
                    self.adapters.as_ref(),
                    adapter_idx,
                    self.bias.as_deref(),
                )?;
                y = self.forward_cuda(dev, &shape, x, adapter_idx)?;
            }
        }
        Ok(y)
    }

    fn forward_cuda(
        &self,
        dev: &CudaDevice,
        shape: &LoraShape,
        x: &[bf16],
        adapter_idx: Option<&[i32]>,
    ) -> Result<Vec<bf16>> {
        let d = CudaLoraLinear::upload(dev, self)?;
        let xd = dev.upload(x)?;
        let idx = adapter_idx.map(|i| dev.upload(i)).transpose()?;
        let mut y = dev.zeros::<bf16>(shape.m * shape.n)?;
        let term = LoraTerm::adapted(idx.as_ref());
        d.forward(&xd, shape.m, &mut y, Accumulate::Overwrite, term)?;
        dev.download(&y)
    }

    /// The backward of [`forward`](Self::forward) for upstream gradient `dy [rows, out_features]`:
    /// returns `dx [rows, in_features]` and ADDS the adapter gradients into `grads` (gradient
    /// accumulation is a sequence of calls on the same `grads`).
    pub fn backward(
        &self,
        device: &Device,
        x: &[bf16],
        dy: &[bf16],
        rows: usize,
        adapter_idx: Option<&[i32]>,
        grads: &mut LoraGrads,
    ) -> Result<Vec<bf16>> {
        let shape = self.shape(rows);
        let mut dx = vec![bf16::ZERO; rows * self.in_features];
        match device {
            Device::Cpu => cpu::backward(
                &shape,
                x,
                self.weight.as_ref(),
                self.adapters.as_ref(),
                adapter_idx,
                dy,
                &mut dx,
                &mut grads.a,
                &mut grads.b,
                Accumulate::Overwrite,
            )?,
            Device::Cuda(dev) => {
                shape.check(
                    "lora backward (cuda)",
                    x,
                    self.weight.as_ref(),
                    self.adapters.as_ref(),
                    adapter_idx,
                    None,
                )?;
                let na = self.adapters.len();
                let (r, n, k) = (self.adapters.rank, self.out_features, self.in_features);
                if grads.a.len() != na * r * k || grads.b.len() != na * n * r {
                    return Err(shape_err(
                        "lora backward (cuda)",
                        format!("grads of {} and {}", na * r * k, na * n * r),
                        format!("{} and {}", grads.a.len(), grads.b.len()),
                    ));
                }
                if dy.len() != rows * n {
                    return Err(shape_err(
                        "lora backward (cuda)",
                        format!("dy of {}", rows * n),
                        dy.len(),
                    ));
                }
                let d = CudaLoraLinear::upload(dev, self)?;
                let idx = adapter_idx.map(|i| dev.upload(i)).transpose()?;
                let xd = dev.upload(x)?;
                let dyd = dev.upload(dy)?;
                let mut dxd = dev.zeros::<bf16>(rows * k)?;
                let mut ga = dev.upload(&grads.a)?;
                let mut gb = dev.upload(&grads.b)?;
                let term = LoraBackTerm::adapted(idx.as_ref(), (&mut ga, &mut gb));
                d.backward(&xd, &dyd, rows, &mut dxd, Accumulate::Overwrite, term)?;
                dx = dev.download(&dxd)?;
                grads.a = dev.download(&ga)?;
                grads.b = dev.download(&gb)?;
            }
        }
        Ok(dx)
    }

    /// Folds adapter `adapter` into the base weight, `W += s · B A`, and returns the largest
    /// absolute rounding error of the stored weight against the exact f32 sum (bf16 rounding for
    /// a dense weight; dequantize, add, re-quantize with the same block size and statistics for
    /// NF4).
    pub fn merge(&mut self, adapter: usize) -> Result<f32> {
        self.fold(adapter, 1.0)
    }

    /// The inverse of [`merge`](Self::merge): `W -= s · B A`, same error report.
    pub fn unmerge(&mut self, adapter: usize) -> Result<f32> {
        self.fold(adapter, -1.0)
    }

    fn fold(&mut self, adapter: usize, sign: f32) -> Result<f32> {
        const OP: &str = "lora merge";
        if adapter >= self.adapters.len() {
            return Err(invalid(
                OP,
                format!("adapter {adapter} of {}", self.adapters.len()),
            ));
        }
        let shape = self.shape(1);
        let mut target = cpu::weight_f32(&shape, self.weight.as_ref())?;
        cpu::add_delta(&shape, self.adapters.as_ref(), adapter, sign, &mut target)?;
        let (stored, err) = match &self.weight {
            BaseWeight::Dense(_) => {
                let w: Vec<bf16> = target.iter().map(|v| bf16::from_f32(*v)).collect();
                let back: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                (BaseWeight::Dense(w), max_abs_diff(&back, &target))
            }
            BaseWeight::Nf4(t) => {
                let stats = t.scales.statistics();
                let mut q = Nf4Tensor::quantize(
                    &Device::Cpu,
                    &FloatVec::F32(target.clone()),
                    &t.shape,
                    t.blocksize,
                    stats,
                )?;
                q.dtype = t.dtype;
                let new_shape = self.shape(1);
                let back = cpu::weight_f32(
                    &new_shape,
                    WeightRef::Nf4 {
                        packed: &q.packed,
                        scales: q.scales.as_ref(),
                        blocksize: q.blocksize,
                    },
                )?;
                let err = max_abs_diff(&back, &target);
                (BaseWeight::Nf4(q), err)
            }
        };
        self.weight = stored;
        Ok(err)
    }
}

/// A [`LoraLinear`] resident on a CUDA device: weight (dense or NF4), adapter stack and bias
/// uploaded once, then any number of forward and backward calls on device buffers.
#[derive(Debug)]
pub struct CudaLoraLinear {
    dev: CudaDevice,
    out_features: usize,
    in_features: usize,
    rank: usize,
    n_adapters: usize,
    weight: CudaBaseWeight,
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    scales: CudaSlice<f32>,
    bias: Option<CudaSlice<bf16>>,
}

impl CudaLoraLinear {
    /// Copies `layer` to `dev`.
    pub fn upload(dev: &CudaDevice, layer: &LoraLinear) -> Result<CudaLoraLinear> {
        let weight = match &layer.weight {
            BaseWeight::Dense(w) => CudaBaseWeight::Dense(dev.upload(w)?),
            BaseWeight::Nf4(t) => CudaBaseWeight::Nf4(crate::nf4::CudaNf4::upload(dev, t)?),
        };
        Ok(CudaLoraLinear {
            dev: dev.clone(),
            out_features: layer.out_features,
            in_features: layer.in_features,
            rank: layer.adapters.rank,
            n_adapters: layer.adapters.len(),
            weight,
            a: dev.upload(&layer.adapters.a)?,
            b: dev.upload(&layer.adapters.b)?,
            scales: dev.upload(&layer.adapters.scales)?,
            bias: layer.bias.as_ref().map(|b| dev.upload(b)).transpose()?,
        })
    }

    /// A layer whose weight is already on `dev` (nothing of it crosses the bus again: the way a
    /// weight quantized on the device stays there), with `adapters` and no bias uploaded.
    pub fn from_device(
        dev: &CudaDevice,
        out_features: usize,
        in_features: usize,
        weight: CudaBaseWeight,
        adapters: &AdapterStack,
    ) -> Result<CudaLoraLinear> {
        const OP: &str = "cuda lora linear";
        let numel = out_features
            .checked_mul(in_features)
            .ok_or_else(|| invalid(OP, "out_features x in_features overflows"))?;
        let have = match &weight {
            CudaBaseWeight::Dense(w) => w.len(),
            CudaBaseWeight::Nf4(q) => q.n,
        };
        if numel == 0 || have != numel {
            return Err(shape_err(
                OP,
                format!("a weight of {out_features}x{in_features}"),
                have,
            ));
        }
        let (n, r) = (adapters.len(), adapters.rank);
        if adapters.a.len() != n * r * in_features || adapters.b.len() != n * out_features * r {
            return Err(shape_err(
                OP,
                format!("{n} adapters of rank {r} for {out_features}x{in_features}"),
                format!("A of {}, B of {}", adapters.a.len(), adapters.b.len()),
            ));
        }
        Ok(CudaLoraLinear {
            dev: dev.clone(),
            out_features,
            in_features,
            rank: r,
            n_adapters: n,
            weight,
            a: dev.upload(&adapters.a)?,
            b: dev.upload(&adapters.b)?,
            scales: dev.upload(&adapters.scales)?,
            bias: None,
        })
    }

    fn shape(&self, rows: usize) -> LoraShape {
        LoraShape {
            m: rows,
            n: self.out_features,
            k: self.in_features,
            rank: self.rank,
            n_adapters: self.n_adapters,
        }
    }

    fn lora(&self) -> CudaLoraRef<'_> {
        CudaLoraRef {
            a: &self.a,
            b: &self.b,
            scales: &self.scales,
        }
    }

    /// `y [rows, out_features] = x W^T + bias` for `x [rows, in_features]`, plus the LoRA term
    /// when `term` is [`LoraTerm::Adapted`], queued on the device's stream: overwritten, or with
    /// [`Accumulate::Add`] added into in the kernels' epilogue (a residual `y += x W^T + ...`
    /// without a temporary; one bf16 rounding of the sum). [`LoraTerm::Base`] runs the base
    /// gemv/GEMM kernel alone, no LoRA kernel at all (a frozen projection, or the adapters
    /// switched off).
    pub fn forward(
        &self,
        x: &CudaSlice<bf16>,
        rows: usize,
        y: &mut CudaSlice<bf16>,
        acc: Accumulate,
        term: LoraTerm<'_>,
    ) -> Result<()> {
        let (shape, adapter_idx, keep) = match term {
            LoraTerm::Base => (self.base_shape(rows), None, None),
            LoraTerm::Adapted { adapter_idx, keep } => (self.shape(rows), adapter_idx, keep),
        };
        launch::lora_forward(
            &self.dev,
            &shape,
            x,
            self.weight.as_ref(),
            self.lora(),
            adapter_idx,
            self.bias.as_ref(),
            y,
            acc,
            keep,
        )
    }

    /// `dx [rows, in_features] = dy W` (overwritten, or added into with [`Accumulate::Add`], in
    /// the kernels' epilogue) for the forward's `x` and `dy [rows, out_features]`, plus the LoRA
    /// term when `term` is [`LoraBackTerm::Adapted`], which also ADDS the adapter gradients
    /// into its `grads`. [`LoraBackTerm::Base`] runs the dx GEMM alone.
    pub fn backward(
        &self,
        x: &CudaSlice<bf16>,
        dy: &CudaSlice<bf16>,
        rows: usize,
        dx: &mut CudaSlice<bf16>,
        acc: Accumulate,
        term: LoraBackTerm<'_>,
    ) -> Result<()> {
        let (shape, adapter_idx, grads, kept) = match term {
            LoraBackTerm::Base => (self.base_shape(rows), None, None, None),
            LoraBackTerm::Adapted {
                adapter_idx,
                kept,
                grads,
            } => (self.shape(rows), adapter_idx, Some(grads), kept),
        };
        launch::lora_backward(
            &self.dev,
            &shape,
            x,
            dy,
            self.weight.as_ref(),
            self.lora(),
            adapter_idx,
            dx,
            grads,
            acc,
            kept,
        )
    }

    /// The resident adapter stack, A `[adapters, rank, in_features]` and B
    /// `[adapters, out_features, rank]` (bf16), for an optimizer that updates them in place: the
    /// mixed-precision trainer keeps f32 master copies elsewhere and has AdamW write their bf16
    /// rounding here, so the base weight is never uploaded again. Every launch checks these
    /// buffers' lengths and device again, so replacing one by a buffer of another length is a
    /// typed error at the next call, never an out-of-bounds access.
    pub fn adapters_mut(&mut self) -> (&mut CudaSlice<bf16>, &mut CudaSlice<bf16>) {
        (&mut self.a, &mut self.b)
    }

    /// The length of the LoRA intermediate `u = s x A^T` of `rows` rows, `[rows, adapters *
    /// rank]` bf16: what [`LoraTerm::Adapted`]'s `keep` receives and
    /// [`LoraBackTerm::Adapted`]'s `kept` gives back.
    pub fn kept_len(&self, rows: usize) -> usize {
        rows * self.rank * self.n_adapters
    }

    /// The shape of a call without the LoRA term: no adapter columns.
    fn base_shape(&self, rows: usize) -> LoraShape {
        LoraShape {
            rank: 0,
            n_adapters: 0,
            ..self.shape(rows)
        }
    }
}

/// What a [`CudaLoraLinear::forward`] adds to `x W^T + bias`.
#[derive(Debug)]
pub enum LoraTerm<'a> {
    /// Nothing: the base projection alone.
    Base,
    /// The LoRA term `s (x A^T) B^T` of each row's adapter.
    Adapted {
        /// One adapter index per row (outside `0..adapters`: base only for that row); `None`:
        /// adapter 0 for every row.
        adapter_idx: Option<&'a CudaSlice<i32>>,
        /// Where to leave the intermediate `u = s x A^T` ([`CudaLoraLinear::kept_len`] bf16; a
        /// row's other adapters' columns 0) for the backward, which then does not form it again.
        keep: Option<&'a mut CudaSlice<bf16>>,
    },
}

impl<'a> LoraTerm<'a> {
    /// The LoRA term of the adapters `adapter_idx` picks, nothing kept.
    pub fn adapted(adapter_idx: Option<&'a CudaSlice<i32>>) -> Self {
        LoraTerm::Adapted {
            adapter_idx,
            keep: None,
        }
    }
}

/// What a [`CudaLoraLinear::backward`] adds to `dy W`.
#[derive(Debug)]
pub enum LoraBackTerm<'a> {
    /// Nothing: `dy W` alone, no adapter gradient formed.
    Base,
    /// The LoRA term's input gradient, and its adapter gradients added into `grads`.
    Adapted {
        /// The forward's adapter indices (see [`LoraTerm::Adapted`]).
        adapter_idx: Option<&'a CudaSlice<i32>>,
        /// What the forward left in `keep`, for the same `x`, rows and indices (and adapters
        /// not updated since): one rank product fewer.
        kept: Option<&'a CudaSlice<bf16>>,
        /// `grad_a [adapters, rank, in_features]` and `grad_b [adapters, out_features, rank]`.
        grads: (&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>),
    },
}

impl<'a> LoraBackTerm<'a> {
    /// The LoRA term of the adapters `adapter_idx` picks, formed anew, its gradients added into
    /// `grads`.
    pub fn adapted(
        adapter_idx: Option<&'a CudaSlice<i32>>,
        grads: (&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>),
    ) -> Self {
        LoraBackTerm::Adapted {
            adapter_idx,
            kept: None,
            grads,
        }
    }
}

/// The frozen weight `[out_features, in_features]` of a [`CudaLoraLinear`], already on the device
/// (made there, e.g. quantized by [`crate::nf4::CudaNf4::quantize`], or uploaded).
#[derive(Debug)]
pub enum CudaBaseWeight {
    /// bf16, row-major.
    Dense(CudaSlice<bf16>),
    /// NF4 codes of the flattened tensor.
    Nf4(crate::nf4::CudaNf4),
}

impl CudaBaseWeight {
    fn as_ref(&self) -> CudaWeightRef<'_> {
        match self {
            CudaBaseWeight::Dense(w) => CudaWeightRef::Dense(w),
            CudaBaseWeight::Nf4(q) => CudaWeightRef::Nf4 {
                packed: &q.packed,
                scales: q.scales_ref(),
                blocksize: q.blocksize,
            },
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}
