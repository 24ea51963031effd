//! The tensor-core attention (`kernels/flash_attention.cu`, `ops::AttentionKernels::Flash`)
//! against the CPU reference `qadapt::ops::attention` (run in f32 on the same bf16-valued inputs),
//! at awkward shapes: seq not a multiple of the 64-row block, seq = 1, batch > 1, GQA and MQA
//! (heads != kv_heads), every supported head size, and one sequence longer than 4096.
//!
//! Tolerance, per output: `|got - want| <= atol + 2^-6 |want|` with `atol = TOL * max|want|`.
//! 2^-6 covers the final bf16 rounding (as in model_ops_cuda.rs). `atol` covers what the kernels
//! round on purpose: P (and dS) enter the mma as bf16 (relative error <= 2^-9 per entry), so an
//! output that sums many such terms with cancelling signs is off by about 2^-9 of the magnitude of
//! its terms, and delta comes from the bf16 `out` instead of `rowsum(P dP)`. TOL = 2^-7 (7.8e-3)
//! of the output's largest magnitude; the worst error seen on these shapes on the virtual device
//! is 5.3e-3 (dk at seq 4165; every case prints its own). A real GPU's mma rounds its internal
//! sums differently, which moves these figures by f32 ulps, far below the bf16 terms above.
//!
//! Needs a CUDA device (or the virtual one: `just test-vgpu`): ignored by `cargo test`.

use half::bf16;
use qadapt::cuda::CudaDevice;
use qadapt::cuda::ops::{self, AttentionKernels, AttentionKernels::*};
use qadapt::ops::attention::{AttentionShape, backward, forward};

const RTOL: f32 = 1.0 / 64.0;
const TOL: f32 = 1.0 / 128.0;
/// The smallest `max|want|` the absolute tolerance scales with: an output that is 0 in exact
/// arithmetic (dq at seq = 1, where dP = delta) comes out as the f32 rounding of dP - delta.
const FLOOR: f32 = 1.0 / 1024.0;

use crate::common::cuda_device as device;

use crate::common::rand_bf16;

/// Panics with the worst element unless `|got - want| <= TOL max|want| + RTOL |want|`
/// everywhere; returns the largest `|got - want| / max|want|` (for the record).
fn assert_close(what: &str, got: &[bf16], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(FLOOR, |a, x| a.max(x.abs()));
    let atol = TOL * scale;
    let mut worst_rel = 0f32;
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f32();
        let err = (g - w).abs();
        assert!(
            err <= atol + RTOL * w.abs(),
            "{what}: element {i}: got {g}, want {w} (atol {atol}, rtol {RTOL})"
        );
        worst_rel = worst_rel.max(err / scale);
    }
    worst_rel
}

/// Runs the flash forward (and backward, if `bwd`) on `sh` and compares with the CPU reference.
fn check(dev: &CudaDevice, sh: AttentionShape, bwd: bool) {
    check_packed(dev, sh, None, bwd);
}

/// [`check`] with packed rows' `segments` (the CPU reference's and the device's).
fn check_packed(dev: &CudaDevice, sh: AttentionShape, segments: Option<&[u32]>, bwd: bool) {
    let (batch, seq, heads, kv_heads, d) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let n = batch * seq;
    let (qb, q) = rand_bf16(30, n * heads * d, 2.0);
    let (kb, k) = rand_bf16(31, n * kv_heads * d, 2.0);
    let (vb, v) = rand_bf16(32, n * kv_heads * d, 1.0);
    let (dob, dout) = rand_bf16(33, n * heads * d, 1.0);
    let mut p = vec![0f32; batch * heads * seq * seq];
    let mut out = vec![0f32; q.len()];
    forward(sh, &q, &k, &v, segments, &mut p, &mut out).unwrap();
    let segd = segments.map(|s| ops::CudaSegments::new(dev, batch, seq, s).unwrap());

    let (qd, kd, vd) = (
        dev.upload(&qb).unwrap(),
        dev.upload(&kb).unwrap(),
        dev.upload(&vb).unwrap(),
    );
    let mut lse = dev.upload(&vec![f32::NAN; n * heads]).unwrap();
    let mut od = dev.upload(&vec![bf16::from_f32(7.0); q.len()]).unwrap();
    let segs = segd.as_ref();
    ops::attention_forward(dev, Flash, sh, &qd, &kd, &vd, segs, &mut lse, &mut od).unwrap();
    let tag = format!("{sh:?}, packed {}", segments.is_some());
    let e_out = assert_close(&format!("out, {tag}"), &dev.download(&od).unwrap(), &out);

    // lse against the reference's: P[i, i] = exp(S[i, i] - lse_i), so lse_i = S[i, i] - log P[i, i].
    let lse_got = dev.download(&lse).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    for b in 0..batch {
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            for i in 0..seq {
                let s_ii: f32 = (0..d)
                    .map(|e| {
                        q[((b * seq + i) * heads + h) * d + e]
                            * k[((b * seq + i) * kv_heads + g) * d + e]
                    })
                    .sum::<f32>()
                    * scale;
                let want = s_ii - p[((b * heads + h) * seq + i) * seq + i].ln();
                let got = lse_got[(b * heads + h) * seq + i];
                assert!(
                    (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                    "lse[{b}, {h}, {i}], {tag}: got {got}, want {want}"
                );
            }
        }
    }
    if !bwd {
        println!("{tag}: out {e_out:.2e} (forward only)");
        return;
    }

    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    backward(sh, &q, &k, &v, &p, &dout, &mut dq, &mut dk, &mut dv).unwrap();
    let dod = dev.upload(&dob).unwrap();
    // delta from the forward's out, and recomputed from lse alone (the scalar path's contract).
    for (delta_from, o) in [("out", Some(&od)), ("recomputed", None)] {
        let mut dqd = dev.upload(&vec![bf16::from_f32(7.0); q.len()]).unwrap();
        let mut dkd = dev.upload(&vec![bf16::from_f32(7.0); k.len()]).unwrap();
        let mut dvd = dev.upload(&vec![bf16::from_f32(7.0); v.len()]).unwrap();
        ops::attention_backward(
            dev, Flash, sh, &qd, &kd, &vd, segs, o, &lse, &dod, &mut dqd, &mut dkd, &mut dvd,
        )
        .unwrap();
        let tag = format!("{tag}, delta {delta_from}");
        let e_dq = assert_close(&format!("dq, {tag}"), &dev.download(&dqd).unwrap(), &dq);
        let e_dk = assert_close(&format!("dk, {tag}"), &dev.download(&dkd).unwrap(), &dk);
        let e_dv = assert_close(&format!("dv, {tag}"), &dev.download(&dvd).unwrap(), &dv);
        println!(
            "{tag}: worst |err| / max|ref|: out {e_out:.2e}, dq {e_dq:.2e}, dk {e_dk:.2e}, dv {e_dv:.2e}"
        );
    }
}

fn shape(
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> AttentionShape {
    AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_flash_attention_matches_cpu() {
    let dev = device();
    for sh in [
        // Batch > 1, GQA (2 query heads per kv head), seq 100 = one full and one partial block.
        shape(2, 100, 4, 2, 64),
        // seq = 1: one live key, a block of 63 padding rows.
        shape(1, 1, 2, 1, 128),
        shape(3, 1, 1, 1, 16),
        // MHA, D = 32, three blocks (the last of 2 rows).
        shape(1, 130, 3, 3, 32),
        // MQA, D = 16, seq below one block.
        shape(2, 33, 4, 1, 16),
        // D = 128 over two partial-tile blocks (dkv's 16-query tiles).
        shape(1, 77, 2, 1, 128),
    ] {
        check(&dev, sh, true);
    }
}

/// A sequence longer than 4096 (66 blocks of 64, the last of 5 rows), one head: the CPU
/// reference keeps the [seq, seq] probabilities, and the virtual device runs the 2.2e8
/// multiply-adds of each product on the CPU, so one head keeps it to seconds there.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_flash_attention_long_sequence() {
    let dev = device();
    check(&dev, shape(1, 4165, 1, 1, 64), true);
}

/// Packed rows (`segments`): sequences that start inside a 64-row block and across blocks, a
/// one-token sequence, a block whose first query's sequence began two blocks earlier, and
/// queries whose keys all lie in a later block than the block's first key block (their running
/// max stays -inf there), against the CPU reference with the same segments. Also the scalar
/// kernels (head size 8) on the same rows.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_flash_attention_packed_rows_match_cpu() {
    let dev = device();
    let seq = 200;
    // Row 0: sequences starting at 0, 37, 38 (one token), 64, 70 and 150; row 1: one sequence
    // of 130, then one of 70 starting inside the third block.
    let starts = [[0usize, 37, 38, 39, 64, 70, 150].as_slice(), &[0, 130]];
    let mut segments = Vec::new();
    for row in starts {
        for i in 0..seq {
            segments.push(*row.iter().filter(|&&s| s <= i).max().unwrap() as u32);
        }
    }
    for sh in [shape(2, seq, 4, 2, 64), shape(2, seq, 2, 1, 16)] {
        check_packed(&dev, sh, Some(&segments), true);
    }
    // The scalar kernels: forward and backward against the CPU reference.
    let sh = shape(2, seq, 2, 1, 8);
    let n = 2 * seq;
    let (qb, q) = rand_bf16(40, n * 2 * 8, 2.0);
    let (kb, k) = rand_bf16(41, n * 8, 2.0);
    let (vb, v) = rand_bf16(42, n * 8, 1.0);
    let (dob, dout) = rand_bf16(43, n * 2 * 8, 1.0);
    let mut p = vec![0f32; 2 * 2 * seq * seq];
    let mut out = vec![0f32; q.len()];
    forward(sh, &q, &k, &v, Some(&segments), &mut p, &mut out).unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    backward(sh, &q, &k, &v, &p, &dout, &mut dq, &mut dk, &mut dv).unwrap();
    let segd = ops::CudaSegments::new(&dev, 2, seq, &segments).unwrap();
    let (qd, kd, vd, dod) = (
        dev.upload(&qb).unwrap(),
        dev.upload(&kb).unwrap(),
        dev.upload(&vb).unwrap(),
        dev.upload(&dob).unwrap(),
    );
    let mut lse = dev.zeros::<f32>(n * 2).unwrap();
    let mut od = dev.zeros::<bf16>(q.len()).unwrap();
    let segs = Some(&segd);
    ops::attention_forward(&dev, Scalar, sh, &qd, &kd, &vd, segs, &mut lse, &mut od).unwrap();
    assert_close("scalar out, packed", &dev.download(&od).unwrap(), &out);
    let mut dqd = dev.zeros::<bf16>(q.len()).unwrap();
    let mut dkd = dev.zeros::<bf16>(k.len()).unwrap();
    let mut dvd = dev.zeros::<bf16>(v.len()).unwrap();
    ops::attention_backward(
        &dev, Scalar, sh, &qd, &kd, &vd, segs, None, &lse, &dod, &mut dqd, &mut dkd, &mut dvd,
    )
    .unwrap();
    assert_close("scalar dq, packed", &dev.download(&dqd).unwrap(), &dq);
    assert_close("scalar dk, packed", &dev.download(&dkd).unwrap(), &dk);
    assert_close("scalar dv, packed", &dev.download(&dvd).unwrap(), &dv);
    // Refusals: a start after its token, and segments of another shape.
    let mut bad = segments.clone();
    bad[5] = 6;
    assert!(ops::CudaSegments::new(&dev, 2, seq, &bad).is_err());
    let other = ops::CudaSegments::new(&dev, 1, seq, &segments[..seq]).unwrap();
    let segs = Some(&other);
    let refused = ops::attention_forward(&dev, Scalar, sh, &qd, &kd, &vd, segs, &mut lse, &mut od);
    assert!(refused.is_err());
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_flash_attention_refuses_bad_shapes() {
    let dev = device();
    // head_dim 8 (the tiny test models) has no tensor-core instantiation: the scalar kernels take it.
    let sh = shape(1, 4, 2, 1, 8);
    assert_eq!(AttentionKernels::for_shape(&sh), Scalar);
    let x = dev.zeros::<bf16>(4 * 2 * 8).unwrap();
    let kv = dev.zeros::<bf16>(4 * 8).unwrap();
    let mut lse = dev.zeros::<f32>(8).unwrap();
    let mut o = dev.zeros::<bf16>(4 * 2 * 8).unwrap();
    assert!(ops::attention_forward(&dev, Flash, sh, &x, &kv, &kv, None, &mut lse, &mut o).is_err());
    // A buffer of the wrong length.
    let sh = shape(1, 4, 2, 1, 16);
    assert_eq!(AttentionKernels::for_shape(&sh), Flash);
    let x = dev.zeros::<bf16>(4 * 2 * 16).unwrap();
    let kv = dev.zeros::<bf16>(4 * 16 + 1).unwrap();
    let mut o = dev.zeros::<bf16>(4 * 2 * 16).unwrap();
    assert!(ops::attention_forward(&dev, Flash, sh, &x, &kv, &kv, None, &mut lse, &mut o).is_err());
    // heads not a multiple of kv_heads.
    let sh = shape(1, 4, 3, 2, 16);
    assert!(ops::attention_forward(&dev, Flash, sh, &x, &kv, &kv, None, &mut lse, &mut o).is_err());
}
