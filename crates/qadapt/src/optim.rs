//! Optimizer pieces of the trainer: the AdamW step (CPU reference and the `adamw_f32` kernel,
//! bit-identical), the global gradient norm and its clipping coefficient, and the warmup + cosine
//! learning-rate schedule.
//!
//! The step follows torch.optim.AdamW (decoupled weight decay) operation by operation in f32; the
//! bias corrections are computed in f64 on the host and passed as f32 scalars, as torch does with
//! its Python floats. See `QadaptAdamwArgs` in `kernels/include/qadapt.h` for the formula.

use cudarc::driver::{CudaSlice, UnifiedSlice};
use half::bf16;
use rayon::prelude::*;

use crate::cuda::{CudaDevice, launch};
use crate::error::{Result, invalid, shape_err};

/// AdamW hyperparameters (torch's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Base learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Decoupled weight decay (multiplies the parameter by `1 - lr * weight_decay`).
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The scalars of one AdamW step (what the kernel takes besides the buffers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step (after the schedule).
    pub lr: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// Multiplies the gradient first (the clipping coefficient, or 1).
    pub grad_scale: f32,
}

impl AdamW {
    /// The scalars of step `t` (1-based) at learning rate `lr`, gradients scaled by `grad_scale`.
    pub fn step(&self, t: u64, lr: f32, grad_scale: f32) -> Result<AdamWStep> {
        if t == 0 {
            return Err(invalid("adamw", "steps count from 1"));
        }
        let bc1 = 1.0 - f64::from(self.beta1).powf(t as f64);
        let bc2 = 1.0 - f64::from(self.beta2).powf(t as f64);
        Ok(AdamWStep {
            lr,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            step_size: (f64::from(lr) / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            grad_scale,
        })
    }
}

fn check_lengths(op: &'static str, n: usize, others: &[(&str, usize)]) -> Result<()> {
    for (what, len) in others {
        if *len != n {
            return Err(shape_err(op, format!("{what} of {n} elements"), len));
        }
    }
    Ok(())
}

/// One AdamW step on the CPU (the reference of `adamw_f32`): updates `param`, `m`, `v` in place
/// and, if given, overwrites `param_bf16` with the rounded parameters.
pub fn adamw_cpu(
    param: &mut [f32],
    param_bf16: Option<&mut [bf16]>,
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw (cpu)";
    let n = param.len();
    let p16_len = param_bf16.as_ref().map_or(n, |p| p.len());
    check_lengths(
        OP,
        n,
        &[
            ("grad", grad.len()),
            ("m", m.len()),
            ("v", v.len()),
            ("param_bf16", p16_len),
        ],
    )?;
    let decay = 1.0 - s.lr * s.weight_decay;
    let (omb1, omb2) = (1.0 - s.beta1, 1.0 - s.beta2);
    let update = |p: &mut f32, g: f32, m: &mut f32, v: &mut f32| {
        let g = g * s.grad_scale;
        let pi = *p * decay;
        *m += omb1 * (g - *m);
        *v = *v * s.beta2 + (g * g) * omb2;
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        *p = pi - s.step_size * (*m / denom);
    };
    const CHUNK: usize = 4096;
    let body = param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK));
    match param_bf16 {
        Some(p16) => body
            .zip(p16.par_chunks_mut(CHUNK))
            .for_each(|((((p, g), m), v), p16)| {
                for i in 0..p.len() {
                    update(&mut p[i], g[i], &mut m[i], &mut v[i]);
                    p16[i] = bf16::from_f32(p[i]);
                }
            }),
        None => body.for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                update(&mut p[i], g[i], &mut m[i], &mut v[i]);
            }
        }),
    }
    Ok(())
}

/// One AdamW step on the device (`adamw_f32`), same contract as [`adamw_cpu`].
pub fn adamw_cuda(
    dev: &CudaDevice,
    param: &mut CudaSlice<f32>,
    param_bf16: Option<&mut CudaSlice<bf16>>,
    grad: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    s: &AdamWStep,
) -> Result<()> {
    launch::adamw(
        dev,
        param,
        param_bf16,
        grad,
        launch::Moments::Device(m, v),
        s,
    )
}

/// AdamW moments in managed memory (cuMemAllocManaged): the paged optimizer of QLoRA. The driver
/// migrates pages to the device when a step prefetches them and back to the host under memory
/// pressure, so optimizer state need not fit on the card next to the model. Zero at creation.
pub struct PagedAdamState {
    m: UnifiedSlice<f32>,
    v: UnifiedSlice<f32>,
}

impl std::fmt::Debug for PagedAdamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedAdamState")
            .field("len", &self.m.len())
            .finish()
    }
}

impl PagedAdamState {
    /// State for `n` parameters. Refuses more than half the device's free memory.
    pub fn new(dev: &CudaDevice, n: usize) -> Result<PagedAdamState> {
        Ok(PagedAdamState {
            m: launch::alloc_managed_f32(dev, n)?,
            v: launch::alloc_managed_f32(dev, n)?,
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.m.len()
    }

    /// Whether the state is empty (never: allocation refuses zero).
    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// State holding the moments `(m, v)` (a resumed run's), for `m.len()` parameters.
    pub fn from_host(dev: &CudaDevice, m: &[f32], v: &[f32]) -> Result<PagedAdamState> {
        if m.len() != v.len() {
            return Err(shape_err("paged adam state", m.len(), v.len()));
        }
        let mut s = PagedAdamState::new(dev, m.len())?;
        // The zero fill is queued on the stream: let it finish before the host writes.
        dev.synchronize()?;
        s.m.as_mut_slice()?.copy_from_slice(m);
        s.v.as_mut_slice()?.copy_from_slice(v);
        Ok(s)
    }

    /// Copies (m, v) to the host (synchronizes the device first).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<(Vec<f32>, Vec<f32>)> {
        dev.synchronize()?;
        Ok((self.m.as_slice()?.to_vec(), self.v.as_slice()?.to_vec()))
    }
}

/// One AdamW step with paged (managed-memory) moments: prefetched to the device on this step's
/// stream, then the same `adamw_f32` kernel as [`adamw_cuda`].
pub fn adamw_cuda_paged(
    dev: &CudaDevice,
    param: &mut CudaSlice<f32>,
    param_bf16: Option<&mut CudaSlice<bf16>>,
    grad: &CudaSlice<f32>,
    state: &mut PagedAdamState,
    s: &AdamWStep,
) -> Result<()> {
    let PagedAdamState { m, v } = state;
    launch::adamw(
        dev,
        param,
        param_bf16,
        grad,
        launch::Moments::Managed(m, v),
        s,
    )
}

/// Sum of squares in f64 (the CPU reference of the gradient norm).
pub fn sum_squares_cpu(x: &[f32]) -> f64 {
    x.par_chunks(1 << 14)
        .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
        .sum()
}

/// Sum of squares on the device: per-CTA f32 partials (`sum_squares_f32`) added in f64 here.
pub fn sum_squares_cuda(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<f64> {
    launch::sum_squares(dev, &[x])
}

/// The sum of squares of every element of `xs` (a squared global gradient norm): each tensor's
/// per-CTA partials into one buffer, one download, one f64 sum; one synchronization however
/// many tensors.
pub fn sum_squares_cuda_all(dev: &CudaDevice, xs: &[&CudaSlice<f32>]) -> Result<f64> {
    launch::sum_squares(dev, xs)
}

/// Clipping by global norm as torch's `clip_grad_norm_`: scale every gradient by
/// `min(1, max_norm / (total_norm + 1e-6))`.
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f32 {
    (max_norm / (total_norm + 1e-6)).min(1.0) as f32
}

/// Linear warmup to `base_lr` over `warmup_steps`, then a half cosine down to `min_lr` at
/// `total_steps` (and `min_lr` after). Steps count from 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    /// Peak learning rate.
    pub base_lr: f32,
    /// Final learning rate.
    pub min_lr: f32,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Total steps.
    pub total_steps: u64,
}

impl CosineSchedule {
    /// The learning rate of step `t` (1-based).
    pub fn lr(&self, t: u64) -> f32 {
        let (base, min) = (f64::from(self.base_lr), f64::from(self.min_lr));
        if t <= self.warmup_steps {
            return (base * t as f64 / self.warmup_steps.max(1) as f64) as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((t - self.warmup_steps) as f64 / span).min(1.0);
        (min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A straight f64 transcription of torch.optim.AdamW's single-tensor step.
    fn adamw_f64(p: f64, g: f64, m: f64, v: f64, h: &AdamW, lr: f64, t: u64) -> (f64, f64, f64) {
        let p = p * (1.0 - lr * f64::from(h.weight_decay));
        let m = m + (1.0 - f64::from(h.beta1)) * (g - m);
        let v = v * f64::from(h.beta2) + (1.0 - f64::from(h.beta2)) * g * g;
        let bc1 = 1.0 - f64::from(h.beta1).powi(t as i32);
        let bc2 = 1.0 - f64::from(h.beta2).powi(t as i32);
        let denom = v.sqrt() / bc2.sqrt() + f64::from(h.eps);
        (p - lr / bc1 * m / denom, m, v)
    }

    #[test]
    fn adamw_follows_torch_over_several_steps() {
        let h = AdamW {
            lr: 1e-2,
            weight_decay: 0.1,
            ..AdamW::default()
        };
        let n = 10_001;
        let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut p16 = vec![bf16::ZERO; n];
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut r: Vec<(f64, f64, f64)> = p.iter().map(|&x| (f64::from(x), 0.0, 0.0)).collect();
        for t in 1..=5u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * (t as usize + 3)) as f32 * 0.11).cos() * 0.5)
                .collect();
            let s = h.step(t, h.lr, 1.0).unwrap();
            adamw_cpu(&mut p, Some(&mut p16), &g, &mut m, &mut v, &s).unwrap();
            for (i, st) in r.iter_mut().enumerate() {
                *st = adamw_f64(st.0, f64::from(g[i]), st.1, st.2, &h, 1e-2, t);
            }
        }
        for i in 0..n {
            // f32 rounding over 5 steps of O(lr) updates: well below 1e-6 absolute.
            assert!(
                (f64::from(p[i]) - r[i].0).abs() < 2e-6,
                "p[{i}] {} vs {}",
                p[i],
                r[i].0
            );
            assert!((f64::from(m[i]) - r[i].1).abs() < 1e-6);
            assert_eq!(p16[i], bf16::from_f32(p[i]));
        }
        // The first step of Adam moves each parameter by about lr (sign of the gradient).
        let s = h.step(1, h.lr, 1.0).unwrap();
        let (mut q, mut mm, mut vv) = (vec![1.0f32], vec![0.0], vec![0.0]);
        adamw_cpu(&mut q, None, &[3.0], &mut mm, &mut vv, &s).unwrap();
        assert!((q[0] - (1.0 - 1e-2 * 0.1) + 1e-2).abs() < 1e-6, "{}", q[0]);
    }

    #[test]
    fn grad_scale_is_applied_before_the_moments() {
        let h = AdamW::default();
        let s1 = h.step(3, 1e-3, 0.5).unwrap();
        let s2 = h.step(3, 1e-3, 1.0).unwrap();
        let (mut a, mut am, mut av) = (vec![0.2f32], vec![0.1f32], vec![0.01f32]);
        let (mut b, mut bm, mut bv) = (a.clone(), am.clone(), av.clone());
        adamw_cpu(&mut a, None, &[4.0], &mut am, &mut av, &s1).unwrap();
        adamw_cpu(&mut b, None, &[2.0], &mut bm, &mut bv, &s2).unwrap();
        assert_eq!((a[0], am[0], av[0]), (b[0], bm[0], bv[0]));
    }

    #[test]
    fn lengths_and_step_zero_are_refused() {
        let s = AdamW::default().step(1, 1e-3, 1.0).unwrap();
        let mut p = vec![0f32; 4];
        let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 3]);
        assert!(adamw_cpu(&mut p, None, &[0.0; 4], &mut m, &mut v, &s).is_err());
        assert!(AdamW::default().step(0, 1e-3, 1.0).is_err());
    }

    #[test]
    fn norm_and_clipping() {
        let x: Vec<f32> = (0..100_000)
            .map(|i| if i % 2 == 0 { 3.0 } else { -4.0 })
            .collect();
        assert_eq!(sum_squares_cpu(&x), 50_000.0 * 25.0);
        assert_eq!(clip_coefficient(10.0, 20.0), 1.0);
        assert!((clip_coefficient(10.0, 1.0) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn warmup_then_cosine() {
        let s = CosineSchedule {
            base_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(1) - 1e-4).abs() < 1e-9);
        assert!((s.lr(10) - 1e-3).abs() < 1e-9);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-9); // halfway down the cosine
        assert!((s.lr(110) - 1e-4).abs() < 1e-9);
        assert!((s.lr(500) - 1e-4).abs() < 1e-9);
        assert!((1..110).all(|t| s.lr(t + 1) <= s.lr(t) || t < 10));
    }
}
