//! The model-op kernels (`kernels/rmsnorm.cu` ... `attention.cu`) against the CPU references in `qadapt::ops`, on
//! awkward sizes (rows not a multiple of the 8 rows a CTA takes, row lengths that are and are not
//! multiples of 8 so both the 16-byte and the element-by-element paths run).
//!
//! The inputs are bf16; the CPU reference runs in f32 on the same values (widened exactly). Each
//! bf16 output is rounded once from an f32 value that differs from the CPU's only by the order of
//! f32 operations, so it is within 1.5 bf16 ulps of the CPU's unrounded value: we allow
//! `atol + 2^-6 |ref|` (2^-6 = 2 ulps at the bottom of a binade), with an `atol` that covers the
//! f32 rounding of terms that cancel, stated per test. f32 outputs (rstd, dw, the loss) get a
//! relative tolerance for a different summation order. The embedding is exact.
//!
//! Needs a CUDA device: ignored by `cargo test`, run by the GPU bundle; fails loudly without one.

use half::bf16;
use qadapt::cuda::ops::{self, AttentionKernels::Scalar};
use qadapt::ops::Accumulate;
use qadapt::ops::rope::{RopeDirection, RopeScaling, RopeTable, inv_freq};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// bf16 ulps allowed, relative to |ref|.
const RTOL_BF16: f32 = 1.0 / 64.0;

use crate::common::cuda_device as device;

use crate::common::rand_bf16;

fn widen(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Panics with the worst element unless `|got - want| <= atol + rtol |want|` everywhere.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        let bad = excess > 0.0 || excess.is_nan();
        if bad && worst.is_none_or(|(_, e)| excess > e || excess.is_nan()) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: got {}, want {} (atol {atol}, rtol {rtol})",
            got[i], want[i]
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_rmsnorm_matches_cpu() {
    let dev = device();
    // (1000, 64) and (130, 72) split the weight gradient over several row chunks.
    for (rows, dim) in [
        (37usize, 1000usize),
        (9, 999),
        (3, 4104),
        (1, 1),
        (130, 72),
        (1000, 64),
    ] {
        let (xb, x) = rand_bf16(1, rows * dim, 2.0);
        let (wb, w) = rand_bf16(2, dim, 1.5);
        let (dyb, dy) = rand_bf16(3, rows * dim, 1.0);
        let (dx0b, dx0) = rand_bf16(4, rows * dim, 0.5);
        let dw0: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.01).sin()).collect();
        let eps = 1e-5;

        let (mut y, mut rstd) = (vec![0f32; rows * dim], vec![0f32; rows]);
        qadapt::ops::rmsnorm::forward(&x, &w, eps, &mut y, &mut rstd).unwrap();
        let dxd = dev.upload(&xb).unwrap();
        let dwd = dev.upload(&wb).unwrap();
        let mut dyd_out = dev.zeros::<bf16>(rows * dim).unwrap();
        let mut drstd = dev.zeros::<f32>(rows).unwrap();
        ops::rmsnorm_forward(&dev, &dxd, &dwd, eps, &mut dyd_out, &mut drstd).unwrap();
        let tag = format!("rows {rows} dim {dim}");
        // rstd: f32 sums of dim squares in another order (the CPU's sequential sum drifts by
        // ~sqrt(dim) f32 ulps, the rsqrt halves it): relative 3e-5.
        assert_close(
            &format!("rstd, {tag}"),
            &dev.download(&drstd).unwrap(),
            &rstd,
            0.0,
            3e-5,
        );
        // y = w x r: a product, no cancellation.
        assert_close(
            &format!("y, {tag}"),
            &widen(&dev.download(&dyd_out).unwrap()),
            &y,
            1e-6,
            RTOL_BF16,
        );

        for acc in [Accumulate::Overwrite, Accumulate::Add] {
            let mut dx = dx0.clone();
            let mut dw = dw0.clone();
            qadapt::ops::rmsnorm::backward(&x, &w, &rstd, &dy, &mut dx, acc, &mut dw).unwrap();
            let dyd = dev.upload(&dyb).unwrap();
            let mut dxd = dev.upload(&dx0b).unwrap();
            let mut dwd_grad = dev.upload(&dw0).unwrap();
            ops::rmsnorm_backward(
                &dev,
                &dev.upload(&xb).unwrap(),
                &dwd,
                &drstd,
                &dyd,
                &mut dxd,
                acc,
                &mut dwd_grad,
            )
            .unwrap();
            // dx = r (g w - x r mean): the two terms cancel; their f32 rounding is ~1e-6 of
            // r * |g w| <= 4 r, so atol 1e-4 * r_max.
            let rmax = rstd.iter().cloned().fold(0f32, f32::max);
            assert_close(
                &format!("dx {acc:?}, {tag}"),
                &widen(&dev.download(&dxd).unwrap()),
                &dx,
                1e-4 * rmax.max(1.0),
                RTOL_BF16,
            );
            // dw: f32 sums of rows terms of size ~1 in another order (row chunks, then the
            // chunks), added to dw0 (accumulated): 1e-6 per row, relative 1e-5.
            assert_close(
                &format!("dw {acc:?}, {tag}"),
                &dev.download(&dwd_grad).unwrap(),
                &dw,
                1e-6 * rows as f32 * rmax.max(1.0),
                1e-5,
            );
        }
    }
    // Shapes are refused with a typed error, before anything runs.
    let x = dev.zeros::<bf16>(10).unwrap();
    let w = dev.zeros::<bf16>(3).unwrap();
    let (mut y, mut r) = (dev.zeros::<bf16>(10).unwrap(), dev.zeros::<f32>(3).unwrap());
    assert!(ops::rmsnorm_forward(&dev, &x, &w, 1e-5, &mut y, &mut r).is_err());
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_swiglu_matches_cpu() {
    let dev = device();
    for n in [8 * 1000 + 5, 12_345, 7, 64] {
        let (gb, g) = rand_bf16(5, n, 6.0);
        let (ub, u) = rand_bf16(6, n, 2.0);
        let (dhb, dh) = rand_bf16(7, n, 1.0);
        let mut h = vec![0f32; n];
        qadapt::ops::swiglu::forward(&g, &u, &mut h).unwrap();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        qadapt::ops::swiglu::backward(&g, &u, &dh, &mut dg, &mut du).unwrap();

        let (gd, ud, dhd) = (
            dev.upload(&gb).unwrap(),
            dev.upload(&ub).unwrap(),
            dev.upload(&dhb).unwrap(),
        );
        let mut hd = dev.zeros::<bf16>(n).unwrap();
        ops::swiglu_forward(&dev, &gd, &ud, &mut hd).unwrap();
        let (mut dgd, mut dud) = (dev.zeros::<bf16>(n).unwrap(), dev.zeros::<bf16>(n).unwrap());
        ops::swiglu_backward(&dev, &gd, &ud, &dhd, &mut dgd, &mut dud).unwrap();
        // Products of a few f32 factors (expf within 2 ulps). The one sum that cancels is
        // 1 + g (1 - s) near g = -1.28 (where silu' = 0): its f32 rounding is ~1e-7 of
        // |dh u s| <= 2, so atol 1e-6.
        assert_close(
            &format!("h, n {n}"),
            &widen(&dev.download(&hd).unwrap()),
            &h,
            1e-6,
            RTOL_BF16,
        );
        assert_close(
            &format!("dgate, n {n}"),
            &widen(&dev.download(&dgd).unwrap()),
            &dg,
            1e-6,
            RTOL_BF16,
        );
        assert_close(
            &format!("dup, n {n}"),
            &widen(&dev.download(&dud).unwrap()),
            &du,
            1e-6,
            RTOL_BF16,
        );
    }
    let a = dev.zeros::<bf16>(5).unwrap();
    let b = dev.zeros::<bf16>(4).unwrap();
    let mut h = dev.zeros::<bf16>(5).unwrap();
    assert!(ops::swiglu_forward(&dev, &a, &b, &mut h).is_err());
}

/// The mask blend rounds as the f32 reference does (two products and a sum, no FMA), so its bf16
/// output is the reference rounded to bf16, bit for bit; that also pins the mask: a dropped
/// element of the dropout (drop coefficient 0) is exactly 0, one of the blend exactly `a`.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_mask_mix_is_the_cpu_reference_rounded_to_bf16() {
    use qadapt::ops::dropout::{DropoutMask, MaskCoef, mask_mix};
    let dev = device();
    for (n, base) in [
        (8 * 1000 + 5, 0xD1B5_4A32_D192_ED03),
        (12_345, u64::MAX),
        (7, 3),
        (64, 0),
        (1 << 20, 17),
    ] {
        let (ab, a) = rand_bf16(8, n, 2.0);
        let (bb, b) = rand_bf16(9, n, 2.0);
        let (ad, bd) = (dev.upload(&ab).unwrap(), dev.upload(&bb).unwrap());
        for prob in [0.0, 0.1, 0.5] {
            let mask = DropoutMask::new(base, prob).unwrap();
            let k = (1.0 / (1.0 - prob)) as f32;
            for with_b in [false, true] {
                // Dropout a = (k, 0) alone, or d0 + m (d1 - d0): a = (1 - k, 1), b = (k, 0).
                let (ca, cb) = if with_b {
                    (MaskCoef::new(1.0 - k, 1.0), Some(MaskCoef::new(k, 0.0)))
                } else {
                    (MaskCoef::new(k, 0.0), None)
                };
                let mut want = vec![0f32; n];
                mask_mix(mask, &a, ca, cb.map(|c| (&b[..], c)), &mut want).unwrap();
                let mut od = dev.upload(&vec![bf16::from_f32(9.0); n]).unwrap();
                ops::mask_mix(&dev, mask, &ad, ca, cb.map(|c| (&bd, c)), &mut od).unwrap();
                let got = dev.download(&od).unwrap();
                let what = format!("n {n}, prob {prob}, b {with_b}");
                for j in 0..n {
                    let dropped = if with_b { ab[j].to_f32() } else { 0.0 };
                    if !mask.kept(j as u64) {
                        assert_eq!(got[j].to_f32(), dropped, "{what}: dropped element {j}");
                    }
                    assert_eq!(
                        got[j].to_bits(),
                        bf16::from_f32(want[j]).to_bits(),
                        "{what}: element {j}, {} vs the reference {}",
                        got[j],
                        want[j]
                    );
                }
                if prob == 0.0 {
                    assert!((0..n as u64).all(|j| mask.kept(j)), "{what}");
                }
            }
        }
    }
    // Lengths are refused with a typed error, before anything runs.
    let mask = DropoutMask::new(1, 0.1).unwrap();
    let c = MaskCoef::new(1.0, 0.0);
    let a = dev.zeros::<bf16>(10).unwrap();
    let b = dev.zeros::<bf16>(9).unwrap();
    let mut out = dev.zeros::<bf16>(10).unwrap();
    let mut short = dev.zeros::<bf16>(9).unwrap();
    assert!(ops::mask_mix(&dev, mask, &a, c, None, &mut short).is_err());
    assert!(ops::mask_mix(&dev, mask, &a, c, Some((&b, c)), &mut out).is_err());
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_rope_matches_cpu_both_directions() {
    let dev = device();
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    for (batch, seq, heads, d, scaling) in [
        (3usize, 17usize, 5usize, 6usize, RopeScaling::None),
        (2, 33, 4, 128, llama3),
        (1, 300, 3, 66, RopeScaling::None),
    ] {
        let f = inv_freq(d, 10000.0, scaling).unwrap();
        let table = RopeTable::<f32>::new(seq, d, &f).unwrap();
        let dtable = ops::CudaRopeTable::new(&dev, &table).unwrap();
        let (xb, x) = rand_bf16(8, batch * seq * heads * d, 1.0);
        for dir in [RopeDirection::Forward, RopeDirection::Backward] {
            let mut want = x.clone();
            table.apply(&mut want, heads, dir).unwrap();
            let mut xd = dev.upload(&xb).unwrap();
            dtable.apply(&dev, &mut xd, heads, dir).unwrap();
            // x1 c - x2 s may cancel: f32 rounding of terms <= 1 in size, atol 1e-6.
            assert_close(
                &format!("rope {dir:?}, seq {seq} heads {heads} d {d}"),
                &widen(&dev.download(&xd).unwrap()),
                &want,
                1e-6,
                RTOL_BF16,
            );
        }
        let mut short = dev.zeros::<bf16>(seq * heads * d - 1).unwrap();
        assert!(
            dtable
                .apply(&dev, &mut short, heads, RopeDirection::Forward)
                .is_err()
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_embedding_matches_cpu_bit_for_bit() {
    let dev = device();
    for (vocab, dim, tokens) in [(50usize, 100usize, 77usize), (1000, 64, 301), (3, 1, 20)] {
        let (tb, t) = rand_bf16(9, vocab * dim, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        // Repeated ids (a few hot ones) so the scatter-add sums several rows per id.
        let ids: Vec<u32> = (0..tokens)
            .map(|i| {
                if i % 3 == 0 {
                    (vocab as u32 - 1).min(2)
                } else {
                    rng.random_range(0..vocab as u32)
                }
            })
            .collect();
        let mut out = vec![0f32; tokens * dim];
        qadapt::ops::embedding::forward(&ids, &t, vocab, dim, &mut out).unwrap();
        let td = dev.upload(&tb).unwrap();
        let mut od = dev.zeros::<bf16>(tokens * dim).unwrap();
        ops::embedding_forward(&dev, &ids, &td, vocab, dim, &mut od).unwrap();
        assert_eq!(
            widen(&dev.download(&od).unwrap()),
            out,
            "forward, vocab {vocab} dim {dim}"
        );

        let (gb, g) = rand_bf16(11, tokens * dim, 1.0);
        let dt0: Vec<f32> = (0..vocab * dim).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut dt = dt0.clone();
        qadapt::ops::embedding::backward(&ids, &g, vocab, dim, &mut dt).unwrap();
        let mut dtd = dev.upload(&dt0).unwrap();
        ops::embedding_backward(&dev, &ids, &dev.upload(&gb).unwrap(), vocab, dim, &mut dtd)
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&dev.download(&dtd).unwrap()),
            bits(&dt),
            "backward, vocab {vocab} dim {dim}"
        );
    }
    let td = dev.zeros::<bf16>(6).unwrap();
    let mut od = dev.zeros::<bf16>(6).unwrap();
    let err = ops::embedding_forward(&dev, &[2, 3, 0], &td, 3, 2, &mut od).unwrap_err();
    assert!(err.to_string().contains("token id 3 at 1"), "{err}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_cross_entropy_matches_cpu() {
    let dev = device();
    for (rows, vocab) in [
        (13usize, 1000usize),
        (7, 1001),
        (4, 32_000),
        (3, 32_003),
        (1, 1),
    ] {
        let (zb, z) = rand_bf16(12, rows * vocab, 8.0);
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let mut targets: Vec<Option<u32>> = (0..rows)
            .map(|i| (i % 4 != 1).then(|| rng.random_range(0..vocab as u32)))
            .collect();
        targets[0] = Some(vocab as u32 - 1);
        let dloss = 0.7f32;
        let want_loss = qadapt::ops::cross_entropy::forward(&z, &targets, vocab).unwrap();
        let mut want_dz = vec![0f32; rows * vocab];
        qadapt::ops::cross_entropy::backward(&z, &targets, vocab, dloss, &mut want_dz).unwrap();

        let zd = dev.upload(&zb).unwrap();
        let got_loss = ops::cross_entropy_forward(&dev, &zd, &targets, vocab).unwrap();
        let mut dzd = dev
            .upload(&vec![bf16::from_f32(9.0); rows * vocab])
            .unwrap();
        let mut row_loss = dev.zeros::<f32>(rows).unwrap();
        ops::cross_entropy_fused(
            &dev,
            &zd,
            &targets,
            vocab,
            dloss,
            &mut row_loss,
            Some(&mut dzd),
        )
        .unwrap();
        let fused_loss = ops::cross_entropy_mean(&dev, &row_loss, &targets).unwrap();
        let tag = format!("rows {rows} vocab {vocab}");
        // The loss: f32 log-sum-exp of up to 32k terms in another order: relative 1e-5.
        assert!(
            (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
            "loss, {tag}: {got_loss} vs {want_loss}"
        );
        assert_eq!(
            got_loss.to_bits(),
            fused_loss.to_bits(),
            "fused loss, {tag}"
        );
        // dz = g softmax - g [v = t]: the target entry cancels (p - 1); f32 rounding of g-sized
        // terms, atol 1e-5 g.
        let g = dloss / targets.iter().filter(|t| t.is_some()).count() as f32;
        let got_dz = widen(&dev.download(&dzd).unwrap());
        assert_close(
            &format!("dlogits, {tag}"),
            &got_dz,
            &want_dz,
            1e-5 * g,
            RTOL_BF16,
        );
        for (r, t) in targets.iter().enumerate() {
            if t.is_none() {
                assert!(got_dz[r * vocab..(r + 1) * vocab].iter().all(|&v| v == 0.0));
            }
        }
    }
    let zd = dev.zeros::<bf16>(6).unwrap();
    assert!(ops::cross_entropy_forward(&dev, &zd, &[None, None], 3).is_err());
    assert!(ops::cross_entropy_forward(&dev, &zd, &[Some(3), None], 3).is_err());
}

/// The LM head fused with the cross-entropy in row chunks equals the unfused device path (the
/// whole logits from cuBLAS, `cross_entropy_fused`, `dxn = dz H` from cuBLAS) within bf16
/// tolerance, whatever the chunk (dividing the rows or not, one row, all rows), and the CPU
/// reference in f32 within the bf16 rounding of the logits.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_lm_head_cross_entropy_in_chunks_matches_the_whole_logits() {
    use qadapt::cuda::Op;
    use qadapt::ops::cross_entropy::{LmHeadShape, lm_head};
    let dev = device();
    for (rows, hidden, vocab) in [(37usize, 64usize, 1000usize), (9, 72, 1001), (1, 8, 3)] {
        let shape = LmHeadShape {
            rows,
            hidden,
            vocab,
        };
        let (xb, x) = rand_bf16(21, rows * hidden, 1.0);
        let (hb, h) = rand_bf16(22, vocab * hidden, 0.5);
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let mut targets: Vec<Option<u32>> = (0..rows)
            .map(|i| (i % 5 != 2).then(|| rng.random_range(0..vocab as u32)))
            .collect();
        targets[0] = Some(vocab as u32 - 1);
        let dloss = 0.7f32;
        let (xd, hd) = (dev.upload(&xb).unwrap(), dev.upload(&hb).unwrap());

        // Unfused: the whole [rows, vocab] logits.
        let mut z = dev.zeros::<bf16>(rows * vocab).unwrap();
        dev.gemm_bf16(
            &xd,
            Op::N,
            &hd,
            Op::T,
            &mut z,
            (rows, vocab, hidden),
            1.0,
            0.0,
        )
        .unwrap();
        let mut dz = dev.zeros::<bf16>(rows * vocab).unwrap();
        let mut row_loss = dev.zeros::<f32>(rows).unwrap();
        ops::cross_entropy_fused(
            &dev,
            &z,
            &targets,
            vocab,
            dloss,
            &mut row_loss,
            Some(&mut dz),
        )
        .unwrap();
        let whole_loss = ops::cross_entropy_mean(&dev, &row_loss, &targets).unwrap();
        let mut dx = dev.zeros::<bf16>(rows * hidden).unwrap();
        dev.gemm_bf16(
            &dz,
            Op::N,
            &hd,
            Op::N,
            &mut dx,
            (rows, hidden, vocab),
            1.0,
            0.0,
        )
        .unwrap();
        let whole_dx = widen(&dev.download(&dx).unwrap());
        let scale = whole_dx.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut cpu_dx = vec![0f32; rows * hidden];
        let cpu_loss = lm_head(&x, &h, shape, &targets, rows, dloss, Some(&mut cpu_dx)).unwrap();

        for chunk in [1, 4, rows, rows + 3] {
            let tag = format!("rows {rows} hidden {hidden} vocab {vocab} chunk {chunk}");
            let mut dxd = dev
                .upload(&vec![bf16::from_f32(9.0); rows * hidden])
                .unwrap();
            let loss = ops::lm_head_cross_entropy(
                &dev,
                &xd,
                &hd,
                shape,
                &targets,
                chunk,
                dloss,
                Some(&mut dxd),
            )
            .unwrap();
            let got = widen(&dev.download(&dxd).unwrap());
            // Against the unfused device path: the same bf16 logits up to cuBLAS' choice of
            // algorithm per row count, so an f32 loss and a bf16 gradient apart at most.
            assert!(
                (loss - whole_loss).abs() <= 1e-3 * whole_loss.abs().max(1.0),
                "loss, {tag}: {loss} vs {whole_loss}"
            );
            assert_close(
                &format!("dxn, {tag}"),
                &got,
                &whole_dx,
                1e-2 * scale,
                RTOL_BF16,
            );
            // Against the f32 reference: the device rounds the logits and their gradient to bf16.
            assert!(
                (loss - cpu_loss).abs() <= 1e-2 * cpu_loss.abs().max(1.0),
                "loss vs cpu, {tag}: {loss} vs {cpu_loss}"
            );
            assert_close(
                &format!("dxn vs cpu, {tag}"),
                &got,
                &cpu_dx,
                2e-2 * scale,
                2.0 * RTOL_BF16,
            );
            let eval =
                ops::lm_head_cross_entropy(&dev, &xd, &hd, shape, &targets, chunk, 0.0, None)
                    .unwrap();
            assert_eq!(
                eval.to_bits(),
                loss.to_bits(),
                "loss without the gradient, {tag}"
            );
        }
    }
    // Refusals before anything runs: no chunk, a short head, a target outside the vocabulary.
    let shape = LmHeadShape {
        rows: 2,
        hidden: 8,
        vocab: 3,
    };
    let (xd, hd) = (
        dev.zeros::<bf16>(16).unwrap(),
        dev.zeros::<bf16>(24).unwrap(),
    );
    let t = [Some(0), Some(2)];
    assert!(ops::lm_head_cross_entropy(&dev, &xd, &hd, shape, &t, 0, 1.0, None).is_err());
    let short = dev.zeros::<bf16>(23).unwrap();
    assert!(ops::lm_head_cross_entropy(&dev, &xd, &short, shape, &t, 1, 1.0, None).is_err());
    let bad = [Some(0), Some(3)];
    assert!(ops::lm_head_cross_entropy(&dev, &xd, &hd, shape, &bad, 1, 1.0, None).is_err());
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_attention_matches_cpu() {
    use qadapt::ops::attention::{AttentionShape, backward, forward};
    let dev = device();
    for (batch, seq, heads, kv_heads, head_dim) in [
        (2usize, 37usize, 4usize, 2usize, 64usize),
        (1, 70, 3, 1, 6),
        (1, 5, 2, 2, 128),
        (2, 33, 8, 2, 256),
        (1, 1, 1, 1, 2),
    ] {
        let sh = AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
        };
        let n = batch * seq;
        let (qb, q) = rand_bf16(20, n * heads * head_dim, 2.0);
        let (kb, k) = rand_bf16(21, n * kv_heads * head_dim, 2.0);
        let (vb, v) = rand_bf16(22, n * kv_heads * head_dim, 1.0);
        let (dob, dout) = rand_bf16(23, n * heads * head_dim, 1.0);
        let mut p = vec![0f32; batch * heads * seq * seq];
        let mut out = vec![0f32; q.len()];
        forward(sh, &q, &k, &v, None, &mut p, &mut out).unwrap();
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        backward(sh, &q, &k, &v, &p, &dout, &mut dq, &mut dk, &mut dv).unwrap();

        let (qd, kd, vd, dod) = (
            dev.upload(&qb).unwrap(),
            dev.upload(&kb).unwrap(),
            dev.upload(&vb).unwrap(),
            dev.upload(&dob).unwrap(),
        );
        let mut lse = dev.zeros::<f32>(n * heads).unwrap();
        let mut od = dev.zeros::<bf16>(q.len()).unwrap();
        ops::attention_forward(&dev, Scalar, sh, &qd, &kd, &vd, None, &mut lse, &mut od).unwrap();
        let mut dqd = dev.upload(&vec![bf16::from_f32(7.0); q.len()]).unwrap();
        let mut dkd = dev.upload(&vec![bf16::from_f32(7.0); k.len()]).unwrap();
        let mut dvd = dev.upload(&vec![bf16::from_f32(7.0); v.len()]).unwrap();
        ops::attention_backward(
            &dev, Scalar, sh, &qd, &kd, &vd, None, None, &lse, &dod, &mut dqd, &mut dkd, &mut dvd,
        )
        .unwrap();
        let tag = format!("{sh:?}");
        // Every output is a sum over up to seq keys (or queries) whose terms may cancel; the f32
        // scores, exps and sums differ from the CPU's in order only (~1e-6 relative), so we allow
        // 1e-3 of the output's largest magnitude on top of the bf16 rounding.
        for (what, got, want) in [
            ("out", od, &out),
            ("dq", dqd, &dq),
            ("dk", dkd, &dk),
            ("dv", dvd, &dv),
        ] {
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
            assert_close(
                &format!("attention {what}, {tag}"),
                &widen(&dev.download(&got).unwrap()),
                want,
                1e-3 * scale,
                RTOL_BF16,
            );
        }
    }
    let bad = AttentionShape {
        batch: 1,
        seq: 2,
        heads: 2,
        kv_heads: 2,
        head_dim: 258,
    };
    let x = dev.zeros::<bf16>(2 * 2 * 258).unwrap();
    let mut lse = dev.zeros::<f32>(4).unwrap();
    let mut o = dev.zeros::<bf16>(2 * 2 * 258).unwrap();
    assert!(ops::attention_forward(&dev, Scalar, bad, &x, &x, &x, None, &mut lse, &mut o).is_err());
}

/// `lm_head_scores` on the device: each row's argmax test equals the first-argmax rule applied to
/// the whole bf16 logits the device computes (ties included: two equal head rows give equal
/// logits, and the lower index wins), and each row's loss equals the fused kernel's on those
/// logits, for chunks of 1, 4 and all rows, on the vectorized (vocab 1000) and scalar (1001)
/// paths.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_lm_head_scores_test_the_first_argmax() {
    use qadapt::cuda::Op;
    use qadapt::ops::cross_entropy::LmHeadShape;
    let dev = device();
    for (rows, hidden, vocab) in [(37usize, 64usize, 1000usize), (9, 72, 1001)] {
        let shape = LmHeadShape {
            rows,
            hidden,
            vocab,
        };
        let (_, x) = rand_bf16(31, rows * hidden, 1.0);
        let (_, mut h) = rand_bf16(32, vocab * hidden, 0.5);
        // Head rows 2 and vocab - 1 equal and long; the rows r % 4 == 3 of x point along them,
        // so their two logits tie as the row's maximum.
        for k in 0..hidden {
            let v = if k % 3 == 0 { -2.0 } else { 2.0 };
            h[2 * hidden + k] = v;
            h[(vocab - 1) * hidden + k] = v;
        }
        let x: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (r, k) = (i / hidden, i % hidden);
                if r % 4 == 3 {
                    if k % 3 == 0 { -1.0 } else { 1.0 }
                } else {
                    v
                }
            })
            .collect();
        let to_bf16 = |v: &[f32]| v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
        let (xd, hd) = (
            dev.upload(&to_bf16(&x)).unwrap(),
            dev.upload(&to_bf16(&h)).unwrap(),
        );
        let mut z = dev.zeros::<bf16>(rows * vocab).unwrap();
        dev.gemm_bf16(
            &xd,
            Op::N,
            &hd,
            Op::T,
            &mut z,
            (rows, vocab, hidden),
            1.0,
            0.0,
        )
        .unwrap();
        let z = widen(&dev.download(&z).unwrap());
        let first_argmax = |row: &[f32]| {
            (0..row.len()).fold(0, |best, c| if row[c] > row[best] { c } else { best })
        };
        // Targets: the first argmax, the tied later maximum, a random token, none.
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        let targets: Vec<Option<u32>> = (0..rows)
            .map(|r| {
                let row = &z[r * vocab..][..vocab];
                match r % 4 {
                    0 => Some(first_argmax(row) as u32),
                    1 => Some(rng.random_range(0..vocab as u32)),
                    2 => None,
                    _ if r % 8 == 3 => Some(vocab as u32 - 1),
                    _ => Some(2),
                }
            })
            .collect();
        let mut row_loss = dev.zeros::<f32>(rows).unwrap();
        let zd = dev.upload(&to_bf16(&z)).unwrap();
        ops::cross_entropy_fused(&dev, &zd, &targets, vocab, 0.0, &mut row_loss, None).unwrap();
        let want_loss = dev.download(&row_loss).unwrap();
        let want_top: Vec<bool> = (0..rows)
            .map(|r| {
                targets[r].is_some_and(|t| first_argmax(&z[r * vocab..][..vocab]) == t as usize)
            })
            .collect();
        // The tie rows: vocab - 1 loses to 2, and 2 wins.
        for r in (3..rows).step_by(4) {
            assert_eq!(want_top[r], r % 8 == 7, "row {r}: the tie is not one");
        }
        assert!(want_top.iter().filter(|&&t| t).count() >= rows / 4);
        for chunk in [1, 4, rows] {
            let tag = format!("rows {rows} vocab {vocab} chunk {chunk}");
            let got = ops::lm_head_scores(&dev, &xd, &hd, shape, &targets, chunk).unwrap();
            let top: Vec<bool> = got.iter().map(|s| s.top).collect();
            assert_eq!(top, want_top, "{tag}");
            for (r, (g, w)) in got.iter().zip(&want_loss).enumerate() {
                assert!(
                    (g.loss - w).abs() <= 1e-3 * w.abs().max(1.0),
                    "{tag} row {r}: {} vs {w}",
                    g.loss
                );
            }
        }
    }
}

/// The KV cache on the device against the CPU reference: three rows prefilled with 5, 1 and 70
/// tokens (one ragged call), then one token each; GQA and head sizes 8, 64 and 128 (the lanes'
/// one to four registers). The cache holds exactly what was written (bit for bit), and every
/// output is within bf16 rounding of the reference's on the same bf16 inputs.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_kv_cache_matches_cpu() {
    use qadapt::ops::attention::{CacheShape, attention_cached, kv_cache_write};
    let dev = device();
    for (heads, kv_heads, head_dim) in [(4usize, 2usize, 8usize), (2, 1, 64), (3, 3, 128)] {
        let sh = CacheShape {
            batch: 3,
            cap: 80,
            heads,
            kv_heads,
            head_dim,
        };
        let (qd, kd) = (heads * head_dim, kv_heads * head_dim);
        let mut kc = vec![0f32; sh.cache_len()];
        let mut vc = vec![0f32; sh.cache_len()];
        let mut kcd = dev.zeros::<bf16>(sh.cache_len()).unwrap();
        let mut vcd = dev.zeros::<bf16>(sh.cache_len()).unwrap();
        let calls: [&[(u32, u32, u32)]; 2] = [
            &[(0, 0, 5), (1, 0, 1), (2, 0, 70)],
            &[(0, 5, 1), (1, 1, 1), (2, 70, 1)],
        ];
        for (c, call) in calls.iter().enumerate() {
            let (mut row, mut pos) = (Vec::new(), Vec::new());
            for &(b, p0, len) in *call {
                row.extend(std::iter::repeat_n(b, len as usize));
                pos.extend(p0..p0 + len);
            }
            let n = row.len();
            let seed = 50 + 10 * c as u64 + head_dim as u64;
            let (qb, q) = rand_bf16(seed, n * qd, 2.0);
            let (kb, k) = rand_bf16(seed + 1, n * kd, 2.0);
            let (vb, v) = rand_bf16(seed + 2, n * kd, 1.0);
            kv_cache_write(sh, &k, &v, &row, &pos, &mut kc, &mut vc).unwrap();
            let mut want = vec![0f32; n * qd];
            attention_cached(sh, &q, &kc, &vc, &row, &pos, &mut want).unwrap();
            let tokens = ops::CudaCacheTokens::new(&dev, sh, &row, &pos).unwrap();
            let (kd_, vd_) = (dev.upload(&kb).unwrap(), dev.upload(&vb).unwrap());
            ops::kv_cache_write(&dev, &tokens, &kd_, &vd_, &mut kcd, &mut vcd).unwrap();
            assert_eq!(widen(&dev.download(&kcd).unwrap()), kc, "keys, call {c}");
            assert_eq!(widen(&dev.download(&vcd).unwrap()), vc, "values, call {c}");
            let qdv = dev.upload(&qb).unwrap();
            let mut out = dev.upload(&vec![bf16::from_f32(9.0); n * qd]).unwrap();
            ops::attention_cached(&dev, &tokens, &qdv, &kcd, &vcd, &mut out).unwrap();
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_close(
                &format!("cached attention, D {head_dim}, call {c}"),
                &widen(&dev.download(&out).unwrap()),
                &want,
                1e-3 * scale,
                RTOL_BF16,
            );
        }
        // Refused before anything runs: a row past the cache, a position past its capacity.
        assert!(ops::CudaCacheTokens::new(&dev, sh, &[3], &[0]).is_err());
        assert!(ops::CudaCacheTokens::new(&dev, sh, &[0], &[80]).is_err());
    }
}
