//! [`Backend`] on host vectors, over the CPU references of [`qadapt::ops`] and
//! [`qadapt::optim`]: the same orchestration as on the device, checkable without a GPU.
//!
//! Buffers are `Vec<f32>`. With [`Precision::Bf16`] every value the CUDA path stores in bf16 is
//! rounded to bf16 once when it is stored (activations, gradients of activations, base weights,
//! the LoRA working copies, and inside a LoRA projection the intermediates the fused kernels
//! round: `u = bf16(s x A^T)` and `g = bf16(s dy B)`), while the math in between is f32 as in the
//! kernels; `rstd`, attention's saved probabilities, masters, gradients and moments stay f32.
//! So this backend differs from the CUDA one only by f32 summation order and by where a sum of
//! two rounded terms is rounded (a few bf16 ulps at most). With [`Precision::F32`] nothing is
//! rounded and the arithmetic is that of the CPU [`crate::Llama`], which checks the
//! orchestration to f32 rounding.

use qadapt::nf4::Nf4Tensor;
use qadapt::ops::attention::{self, AttentionShape};
use qadapt::ops::cross_entropy::{LmHeadShape, RowScore};
use qadapt::ops::dropout::{self, DropoutMask, MaskCoef};
use qadapt::ops::linear::{self, LinearShape};
use qadapt::ops::rope::{RopeDirection, RopeTable};
use qadapt::ops::{Accumulate, cross_entropy, embedding, rmsnorm, swiglu};
use qadapt::optim::{AdamWStep, adamw_cpu, sum_squares_cpu};
use qadapt::{DType, Device, Result};

use crate::backend::{
    BackTerms, Backend, BaseRef, LoraMatrix, LoraRef, MomentPlacement, Terms, round_bf16,
};
use crate::{invalid, shape_err};

/// What the CPU backend rounds (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Store bf16 where the CUDA path does.
    Bf16,
    /// Round nothing (the CPU model's f32 arithmetic).
    F32,
}

/// The CPU backend (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    /// What is rounded to bf16.
    pub precision: Precision,
}

/// A projection on the host: the base weight as the kernels read it (bf16 values, NF4 decoded to
/// bf16; f32 with [`Precision::F32`]) and the LoRA working copy.
#[derive(Debug, Clone)]
pub struct CpuProj {
    out: usize,
    inp: usize,
    w: Vec<f32>,
    lora: Option<CpuLora>,
}

#[derive(Debug, Clone)]
struct CpuLora {
    rank: usize,
    scale: f32,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl CpuBackend {
    /// The backend that rounds like the CUDA path.
    pub fn bf16() -> Self {
        CpuBackend {
            precision: Precision::Bf16,
        }
    }

    /// The backend that rounds nothing.
    pub fn f32() -> Self {
        CpuBackend {
            precision: Precision::F32,
        }
    }

    fn round(&self, x: &mut [f32]) {
        if self.precision == Precision::Bf16 {
            x.iter_mut().for_each(|v| *v = round_bf16(*v));
        }
    }

    fn rounded(&self, mut x: Vec<f32>) -> Vec<f32> {
        self.round(&mut x);
        x
    }

    /// `s x A^T` `[rows, r]`, rounded as the kernel's `u`.
    fn lora_u(&self, l: &CpuLora, x: &[f32], rows: usize, inp: usize) -> Result<Vec<f32>> {
        let mut u = vec![0.0; rows * l.rank];
        let sh = LinearShape {
            rows,
            inp,
            out: l.rank,
        };
        linear::forward(sh, x, &l.a, &mut u, Accumulate::Overwrite)?;
        u.iter_mut().for_each(|v| *v *= l.scale);
        Ok(self.rounded(u))
    }
}

fn store(acc: Accumulate, out: &mut [f32], v: &[f32]) {
    match acc {
        Accumulate::Overwrite => out.copy_from_slice(v),
        Accumulate::Add => out.iter_mut().zip(v).for_each(|(o, x)| *o += *x),
    }
}

fn check(op: &'static str, what: &str, v: &[f32], len: usize) -> Result<()> {
    if v.len() == len {
        Ok(())
    } else {
        Err(shape_err(op, format!("{what} of {len} elements"), v.len()))
    }
}

impl Backend for CpuBackend {
    type Act = Vec<f32>;
    type F32 = Vec<f32>;
    type Rope = RopeTable<f32>;
    type Segments = Vec<u32>;
    type Proj = CpuProj;
    type Moments = (Vec<f32>, Vec<f32>);

    fn describe(&self) -> String {
        match self.precision {
            Precision::Bf16 => "cpu (bf16 activations, f32 math)".into(),
            Precision::F32 => "cpu (f32)".into(),
        }
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn zeros_f32(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(self.rounded(host.to_vec()))
    }

    fn upload_f32(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn download_f32(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn duplicate(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        check("add (cpu)", "src", src, dst.len())?;
        store(Accumulate::Add, dst, src);
        self.round(dst);
        Ok(())
    }

    fn rope(&self, table: &RopeTable<f32>) -> Result<RopeTable<f32>> {
        Ok(table.clone())
    }

    fn segments(&self, batch: usize, seq: usize, starts: &[u32]) -> Result<Vec<u32>> {
        attention::check_segments("attention segments", batch, seq, starts)?;
        Ok(starts.to_vec())
    }

    fn rope_apply(
        &self,
        rope: &RopeTable<f32>,
        x: &mut Vec<f32>,
        heads: usize,
        dir: RopeDirection,
    ) -> Result<()> {
        rope.apply(x, heads, dir)?;
        self.round(x);
        Ok(())
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: &Vec<f32>,
        vocab: usize,
        dim: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        embedding::forward(ids, table, vocab, dim, out)
    }

    fn rmsnorm_forward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        eps: f64,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        rmsnorm::forward(x, w, eps, y, rstd)?;
        self.round(y);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        acc: Accumulate,
        dw: &mut Vec<f32>,
    ) -> Result<()> {
        rmsnorm::backward(x, w, rstd, dy, dx, acc, dw)?;
        self.round(dx);
        Ok(())
    }

    fn swiglu_forward(&self, gate: &Vec<f32>, up: &Vec<f32>, h: &mut Vec<f32>) -> Result<()> {
        swiglu::forward(gate, up, h)?;
        self.round(h);
        Ok(())
    }

    fn swiglu_backward(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dh: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) -> Result<()> {
        swiglu::backward(gate, up, dh, dgate, dup)?;
        self.round(dgate);
        self.round(dup);
        Ok(())
    }

    fn attention_saved_len(&self, sh: AttentionShape) -> usize {
        sh.batch * sh.heads * sh.seq * sh.seq
    }

    fn attention_forward(
        &self,
        sh: AttentionShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        segments: Option<&Vec<u32>>,
        saved: &mut Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        attention::forward(sh, q, k, v, segments.map(Vec::as_slice), saved, out)?;
        self.round(out);
        Ok(())
    }

    fn attention_backward(
        &self,
        sh: AttentionShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        _segments: Option<&Vec<u32>>,
        saved: &Vec<f32>,
        _out: &Vec<f32>,
        dout: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
    ) -> Result<()> {
        // The saved probabilities give rowsum(P dP) directly: no use for the output; they are 0
        // outside each query's sequence, so the segments need no second look.
        attention::backward(sh, q, k, v, saved, dout, dq, dk, dv)?;
        self.round(dq);
        self.round(dk);
        self.round(dv);
        Ok(())
    }

    fn matmul_wt(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        (rows, inp, out): (usize, usize, usize),
        y: &mut Vec<f32>,
    ) -> Result<()> {
        linear::forward(
            LinearShape { rows, inp, out },
            x,
            w,
            y,
            Accumulate::Overwrite,
        )?;
        self.round(y);
        Ok(())
    }

    fn proj(
        &self,
        out: usize,
        inp: usize,
        base: BaseRef<'_>,
        lora: Option<LoraRef<'_>>,
    ) -> Result<CpuProj> {
        const OP: &str = "projection (cpu)";
        let w = match base {
            BaseRef::Dense(w) => {
                check(OP, "W", w, out * inp)?;
                self.rounded(w.to_vec())
            }
            BaseRef::Nf4(t) => nf4_weight(t, out, inp, self.precision)?,
            BaseRef::QuantizeNf4(w) => {
                check(OP, "W", w, out * inp)?;
                let q = crate::nf4::quantize(w, [out, inp], qadapt::nf4::DEFAULT_BLOCKSIZE)?;
                nf4_weight(&q, out, inp, self.precision)?
            }
        };
        let lora = lora
            .map(|l| {
                check(OP, "A", l.a, l.rank * inp)?;
                check(OP, "B", l.b, out * l.rank)?;
                Ok::<_, qadapt::Error>(CpuLora {
                    rank: l.rank,
                    scale: l.scale,
                    a: self.rounded(l.a.to_vec()),
                    b: self.rounded(l.b.to_vec()),
                })
            })
            .transpose()?;
        Ok(CpuProj { out, inp, w, lora })
    }

    /// Keeps nothing ([`Backend::proj_keep_len`] is 0): the backward forms `u` again.
    fn proj_forward(
        &self,
        p: &CpuProj,
        x: &Vec<f32>,
        rows: usize,
        y: &mut Vec<f32>,
        acc: Accumulate,
        terms: Terms<'_, Vec<f32>>,
    ) -> Result<()> {
        let mut t = vec![0.0; rows * p.out];
        let sh = LinearShape {
            rows,
            inp: p.inp,
            out: p.out,
        };
        linear::forward(sh, x, &p.w, &mut t, Accumulate::Overwrite)?;
        if let (Some(l), Terms::Adapted { .. }) = (p.lora.as_ref(), terms) {
            let u = self.lora_u(l, x, rows, p.inp)?;
            let su = LinearShape {
                rows,
                inp: l.rank,
                out: p.out,
            };
            linear::forward(su, &u, &l.b, &mut t, Accumulate::Add)?;
        }
        check("projection forward (cpu)", "y", y, t.len())?;
        store(acc, y, &t);
        self.round(y);
        Ok(())
    }

    fn proj_backward(
        &self,
        p: &CpuProj,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        rows: usize,
        dx: &mut Vec<f32>,
        acc: Accumulate,
        terms: BackTerms<'_, Vec<f32>, Vec<f32>>,
    ) -> Result<()> {
        const OP: &str = "projection backward (cpu)";
        let (lora, grads) = match terms {
            BackTerms::Base => (false, None),
            BackTerms::Adapted { grads, .. } => (true, grads),
        };
        let sh = LinearShape {
            rows,
            inp: p.inp,
            out: p.out,
        };
        let mut t = vec![0.0; rows * p.inp];
        linear::backward(sh, x, &p.w, dy, Some((&mut t, Accumulate::Overwrite)), None)?;
        if let Some(l) = p.lora.as_ref().filter(|_| lora) {
            let (mut ga0, mut gb0);
            let (ga, gb) = match grads {
                Some((ga, gb)) => (ga, gb),
                None => {
                    ga0 = vec![0.0; l.a.len()];
                    gb0 = vec![0.0; l.b.len()];
                    (&mut ga0, &mut gb0)
                }
            };
            check(OP, "dA", ga, l.a.len())?;
            check(OP, "dB", gb, l.b.len())?;
            // g = s dy B (rounded as the kernel's g), dB += dy^T u with u = bf16(s x A^T).
            let u = self.lora_u(l, x, rows, p.inp)?;
            let mut g = vec![0.0; rows * l.rank];
            let su = LinearShape {
                rows,
                inp: l.rank,
                out: p.out,
            };
            linear::backward(
                su,
                &u,
                &l.b,
                dy,
                Some((&mut g, Accumulate::Overwrite)),
                Some(gb),
            )?;
            g.iter_mut().for_each(|v| *v *= l.scale);
            self.round(&mut g);
            // dx += g A, dA += g^T x.
            let sa = LinearShape {
                rows,
                inp: p.inp,
                out: l.rank,
            };
            linear::backward(sa, x, &l.a, &g, Some((&mut t, Accumulate::Add)), Some(ga))?;
        } else if grads.is_some() {
            return Err(invalid(OP, "gradients asked of a projection without LoRA"));
        }
        check(OP, "dx", dx, t.len())?;
        store(acc, dx, &t);
        self.round(dx);
        Ok(())
    }

    fn mask_mix(
        &self,
        mask: DropoutMask,
        a: &Vec<f32>,
        ca: MaskCoef,
        b: Option<(&Vec<f32>, MaskCoef)>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        dropout::mask_mix(mask, a, ca, b.map(|(b, cb)| (b.as_slice(), cb)), out)?;
        self.round(out);
        Ok(())
    }

    fn lm_head_cross_entropy(
        &self,
        xn: &Vec<f32>,
        head: &Vec<f32>,
        shape: LmHeadShape,
        targets: &[Option<u32>],
        chunk_rows: usize,
        dloss: f32,
        mut dxn: Option<&mut Vec<f32>>,
    ) -> Result<f32> {
        // The logits and their gradient rounded as the device stores them (bf16), before the
        // loss reads them and before the GEMM back to xn; dxn rounded once at the end.
        let loss = cross_entropy::lm_head_stored(
            xn,
            head,
            shape,
            targets,
            chunk_rows,
            dloss,
            dxn.as_deref_mut().map(Vec::as_mut_slice),
            |v| self.round(v),
        )?;
        if let Some(d) = dxn {
            self.round(d);
        }
        Ok(loss)
    }

    fn lm_head_scores(
        &self,
        xn: &Vec<f32>,
        head: &Vec<f32>,
        shape: LmHeadShape,
        targets: &[Option<u32>],
        chunk_rows: usize,
    ) -> Result<Vec<RowScore<f32>>> {
        cross_entropy::lm_head_scores_stored(xn, head, shape, targets, chunk_rows, |v| {
            self.round(v)
        })
    }

    fn sum_squares(&self, xs: &[&Vec<f32>]) -> Result<f64> {
        Ok(xs.iter().map(|x| sum_squares_cpu(x)).sum())
    }

    fn moments(&self, len: usize, _placement: MomentPlacement) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((vec![0.0; len], vec![0.0; len]))
    }

    fn moments_from(
        &self,
        m: &[f32],
        v: &[f32],
        _placement: MomentPlacement,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if m.len() != v.len() {
            return Err(shape_err("adam moments (cpu)", m.len(), v.len()));
        }
        Ok((m.to_vec(), v.to_vec()))
    }

    fn download_moments(&self, (m, v): &(Vec<f32>, Vec<f32>)) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((m.clone(), v.clone()))
    }

    fn adamw(
        &self,
        param: &mut Vec<f32>,
        proj: &mut CpuProj,
        which: LoraMatrix,
        grad: &Vec<f32>,
        (m, v): &mut (Vec<f32>, Vec<f32>),
        step: &AdamWStep,
    ) -> Result<()> {
        let l = proj
            .lora
            .as_mut()
            .ok_or_else(|| invalid("adamw (cpu)", "the projection has no LoRA pair"))?;
        let working = match which {
            LoraMatrix::A => &mut l.a,
            LoraMatrix::B => &mut l.b,
        };
        check("adamw (cpu)", "working copy", working, param.len())?;
        adamw_cpu(param, None, grad, m, v, step)?;
        working.copy_from_slice(param);
        self.round(working);
        Ok(())
    }
}

/// The NF4 weight as the backend multiplies with it: decoded to bf16 as the kernels decode
/// (`bf16(level * absmax)`, the f32 product rounded once), or to f32 as
/// [`crate::nf4::dequantize`] does.
fn nf4_weight(t: &Nf4Tensor, out: usize, inp: usize, precision: Precision) -> Result<Vec<f32>> {
    if t.numel() != out * inp {
        return Err(shape_err(
            "projection (cpu)",
            format!("NF4 weight of {out}x{inp}"),
            format!("{:?}", t.shape),
        ));
    }
    let dtype = match precision {
        Precision::Bf16 => DType::BF16,
        Precision::F32 => DType::F32,
    };
    Ok(t.dequantize(&Device::Cpu, dtype)?.to_f32_vec())
}
