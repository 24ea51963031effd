//! Fused LoRA linear: the CPU reference against a naive f64 implementation on awkward sizes,
//! finite-difference checks of the backward in f64, gradient accumulation, many adapters per
//! batch, merge/unmerge, and the CUDA kernels against the same f64 truth (ignored without a
//! device; they panic, not pass, when run on a machine without one).

// The naive f64 helpers take the problem sizes and every operand explicitly, as the math reads.
#![allow(clippy::too_many_arguments)]

use half::bf16;
use qadapt::lora::{
    AdapterStack, BaseWeight, LoraBackTerm, LoraGrads, LoraLinear, LoraRef, LoraShape, LoraTerm,
    WeightRef, cpu,
};
use qadapt::nf4::{Nf4Tensor, Statistics};
use qadapt::ops::Accumulate;
use qadapt::{DType, Device, Error, FloatVec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_bf16(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<bf16> {
    (0..len)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0) * scale))
        .collect()
}

fn f64s(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Base {
    Dense,
    Nf4(Statistics),
}

struct Case {
    layer: LoraLinear,
    x: Vec<bf16>,
    idx: Option<Vec<i32>>,
    m: usize,
}

/// A [`Case`] on a device: its layer, input and adapter indices.
struct OnDevice {
    layer: qadapt::lora::CudaLoraLinear,
    x: qadapt::cuda::DeviceBuffer<bf16>,
    idx: Option<qadapt::cuda::DeviceBuffer<i32>>,
    m: usize,
}

impl Case {
    fn upload(&self, dev: &qadapt::cuda::CudaDevice) -> OnDevice {
        OnDevice {
            layer: qadapt::lora::CudaLoraLinear::upload(dev, &self.layer).unwrap(),
            x: dev.upload(&self.x).unwrap(),
            idx: self.idx.as_ref().map(|i| dev.upload(i).unwrap()),
            m: self.m,
        }
    }
}

impl OnDevice {
    /// The adapted forward of every row into `y`, overwritten or added into.
    fn forward(
        &self,
        y: &mut qadapt::cuda::DeviceBuffer<bf16>,
        acc: Accumulate,
    ) -> qadapt::Result<()> {
        let term = LoraTerm::adapted(self.idx.as_ref());
        self.layer.forward(&self.x, self.m, y, acc, term)
    }
}

fn make_case(
    seed: u64,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    na: usize,
    base: Base,
    bias: bool,
    multi: bool,
) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = rand_bf16(&mut rng, n * k, 0.5);
    let weight = match base {
        Base::Dense => BaseWeight::Dense(w),
        Base::Nf4(stats) => {
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            // Block sizes 32 (a scale per 32-code run of the fused kernels), 64 (QLoRA's) and
            // 128 (a block spanning several runs and rows).
            let blocksize = 32 << (seed % 3);
            BaseWeight::Nf4(
                Nf4Tensor::quantize(&Device::Cpu, &FloatVec::F32(wf), &[n, k], blocksize, stats)
                    .unwrap(),
            )
        }
    };
    let a = rand_bf16(&mut rng, na * r * k, 0.3);
    let b = rand_bf16(&mut rng, na * n * r, 0.3);
    let scales: Vec<f32> = (0..na).map(|i| 0.5 + i as f32 * 0.75).collect();
    let bias = bias.then(|| rand_bf16(&mut rng, n, 1.0));
    let layer = LoraLinear::new(
        n,
        k,
        weight,
        bias,
        AdapterStack::new(r, a, b, scales).unwrap(),
    )
    .unwrap();
    let x = rand_bf16(&mut rng, m * k, 1.0);
    let idx = multi.then(|| (0..m).map(|i| (i % (na + 1)) as i32 - 1).collect());
    Case { layer, x, idx, m }
}

/// W as the bf16 values the kernels use (NF4 dequantized to bf16), in f64.
fn weight_f64(layer: &LoraLinear) -> Vec<f64> {
    match &layer.weight {
        BaseWeight::Dense(w) => f64s(w),
        BaseWeight::Nf4(t) => match t.dequantize(&Device::Cpu, DType::BF16).unwrap() {
            FloatVec::BF16(v) => f64s(&v),
            _ => unreachable!(),
        },
    }
}

/// Naive f64 forward with the documented rounding of u to bf16. Returns (y, tolerance per
/// element): |y_ref - y| may be 2^-8 |y| (bf16 output rounding with margin), 2^-8 of the LoRA
/// magnitude sum |u B| (a u value rounded the other way after f32 accumulation) and 1e-4 of the
/// base magnitude sum |x W| (f32 accumulation).
fn naive_forward(c: &Case, round_u: bool) -> (Vec<f64>, Vec<f64>) {
    let l = &c.layer;
    let (m, n, k, r) = (c.m, l.out_features, l.in_features, l.adapters.rank);
    let w = weight_f64(l);
    let x = f64s(&c.x);
    let a = f64s(&l.adapters.a);
    let b = f64s(&l.adapters.b);
    let mut y = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    for i in 0..m {
        let ad = c.idx.as_ref().map_or(0, |v| v[i]);
        let mut u = vec![0f64; r];
        if ad >= 0 {
            let ad = ad as usize;
            for (j, uj) in u.iter_mut().enumerate() {
                let mut t = 0f64;
                for kk in 0..k {
                    t += x[i * k + kk] * a[(ad * r + j) * k + kk];
                }
                let v = f64::from(l.adapters.scales[ad]) * t;
                *uj = if round_u {
                    f64::from(bf16::from_f64(v).to_f32())
                } else {
                    v
                };
            }
        }
        for o in 0..n {
            let (mut acc, mut mag) = (0f64, 0f64);
            for kk in 0..k {
                acc += x[i * k + kk] * w[o * k + kk];
                mag += (x[i * k + kk] * w[o * k + kk]).abs();
            }
            let mut lmag = 0f64;
            if ad >= 0 {
                for (j, uj) in u.iter().enumerate() {
                    let bv = b[(ad as usize * n + o) * r + j];
                    acc += uj * bv;
                    lmag += (uj * bv).abs();
                }
            }
            if let Some(bias) = &l.bias {
                acc += f64::from(bias[o].to_f32());
            }
            y[i * n + o] = acc;
            tol[i * n + o] = acc.abs() / 256.0 + lmag / 256.0 + 1e-4 * mag + 1e-6;
        }
    }
    (y, tol)
}

fn assert_close(what: &str, got: &[bf16], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((g, w), t)) in got.iter().zip(want).zip(tol).enumerate() {
        let d = (f64::from(g.to_f32()) - w).abs();
        assert!(
            d <= *t,
            "{what}: element {i}: got {g}, want {w}, |diff| {d} > tol {t}"
        );
    }
    if want.len() > 4 {
        assert!(
            want.iter().any(|v| v.abs() > 1e-2),
            "{what}: degenerate test data"
        );
    }
}

test_device!(
    /// The forward (dense and NF4 bases, bias, one or several adapters per call) against a naive
    /// f64 product on awkward sizes.
    fn forward_matches_naive_f64_on_awkward_sizes(dev) {
        let shapes = [
            (1, 1, 1, 1, 1),
            (3, 37, 45, 7, 1),
            (17, 65, 130, 33, 2),
            (5, 129, 96, 128, 1),
            (33, 31, 200, 1, 3),
        ];
        for (si, &(m, n, k, r, na)) in shapes.iter().enumerate() {
            for base in [
                Base::Dense,
                Base::Nf4(Statistics::Plain),
                Base::Nf4(Statistics::DoubleQuant),
            ] {
                for (bias, multi) in [(false, false), (true, true)] {
                    let c = make_case(si as u64 * 7 + 1, m, n, k, r, na, base, bias, multi);
                    let y = c.layer.forward(dev, &c.x, m, c.idx.as_deref()).unwrap();
                    let (want, tol) = naive_forward(&c, true);
                    assert_close(
                        &format!("shape {:?} bias {bias} multi {multi}", (m, n, k, r, na)),
                        &y,
                        &want,
                        &tol,
                    );
                }
            }
        }
    }
);

test_device!(
    /// Rows whose adapter index is -1 get the base alone: exactly a zero-B adapter's output.
    fn base_only_rows_ignore_the_adapters(dev) {
        let c = make_case(3, 9, 23, 41, 5, 2, Base::Dense, true, false);
        let y_none = c.layer.forward(dev, &c.x, 9, Some(&[-1; 9])).unwrap();
        let mut plain = c.layer.clone();
        plain.adapters.b.iter_mut().for_each(|v| *v = bf16::ZERO);
        let y_zero_b = plain.forward(dev, &c.x, 9, None).unwrap();
        assert_eq!(y_none, y_zero_b);
        let y_lora = c.layer.forward(dev, &c.x, 9, None).unwrap();
        assert_ne!(y_none, y_lora);
    }
);

#[test]
fn multi_adapter_rows_equal_single_adapter_calls() {
    let c = make_case(
        11,
        7,
        19,
        33,
        4,
        3,
        Base::Nf4(Statistics::Plain),
        true,
        true,
    );
    let idx = c.idx.clone().unwrap();
    let y = c.layer.forward(&Device::Cpu, &c.x, 7, Some(&idx)).unwrap();
    for (i, &ad) in idx.iter().enumerate() {
        let xi = &c.x[i * 33..(i + 1) * 33];
        let yi = c.layer.forward(&Device::Cpu, xi, 1, Some(&[ad])).unwrap();
        assert_eq!(&y[i * 19..(i + 1) * 19], &yi[..], "row {i} adapter {ad}");
    }
}

/// One adapter's layer in f64 without rounding, `y = x W^T + s (x A^T) B^T` for `x [m, k]`,
/// `W [n, k]`, `A [r, k]`, `B [n, r]`: the reference of the loss `sum(y * g)` and its gradients.
struct Naive<'a> {
    n: usize,
    k: usize,
    r: usize,
    s: f64,
    w: &'a [f64],
    a: &'a [f64],
    b: &'a [f64],
}

impl Naive<'_> {
    /// `t = x_i A^T` of one row.
    fn t(&self, xi: &[f64]) -> Vec<f64> {
        (0..self.r)
            .map(|j| (0..self.k).map(|kk| xi[kk] * self.a[j * self.k + kk]).sum())
            .collect()
    }

    /// `sum(y * g)`, for finite differences.
    fn loss(&self, x: &[f64], g: &[f64]) -> f64 {
        let (n, k, r) = (self.n, self.k, self.r);
        let mut loss = 0.0;
        for (xi, gi) in x.chunks_exact(k).zip(g.chunks_exact(n)) {
            let t = self.t(xi);
            for (o, go) in gi.iter().enumerate() {
                let base: f64 = (0..k).map(|kk| xi[kk] * self.w[o * k + kk]).sum();
                let lora: f64 = (0..r).map(|j| t[j] * self.b[o * r + j]).sum();
                loss += (base + self.s * lora) * go;
            }
        }
        loss
    }

    /// `(dx, dA, dB)` of [`Self::loss`].
    fn backward(&self, x: &[f64], g: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, k, r, s) = (self.n, self.k, self.r, self.s);
        let mut dx = vec![0f64; x.len()];
        let mut da = vec![0f64; r * k];
        let mut db = vec![0f64; n * r];
        for ((xi, gi), dxi) in x
            .chunks_exact(k)
            .zip(g.chunks_exact(n))
            .zip(dx.chunks_exact_mut(k))
        {
            let t = self.t(xi);
            let gb: Vec<f64> = (0..r)
                .map(|j| s * (0..n).map(|o| gi[o] * self.b[o * r + j]).sum::<f64>())
                .collect();
            for kk in 0..k {
                let mut v: f64 = (0..n).map(|o| gi[o] * self.w[o * k + kk]).sum();
                v += (0..r).map(|j| gb[j] * self.a[j * k + kk]).sum::<f64>();
                dxi[kk] = v;
                for j in 0..r {
                    da[j * k + kk] += gb[j] * xi[kk];
                }
            }
            for o in 0..n {
                for j in 0..r {
                    db[o * r + j] += s * gi[o] * t[j];
                }
            }
        }
        (dx, da, db)
    }
}

#[test]
fn naive_backward_matches_finite_differences_in_f64() {
    let (m, n, k, r, s) = (3, 5, 7, 2, 1.75);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut v =
        |len: usize| -> Vec<f64> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let (x, w, a, b, g) = (v(m * k), v(n * k), v(r * k), v(n * r), v(m * n));
    let loss = |x: &[f64], a: &[f64], b: &[f64]| {
        let w = &w;
        Naive {
            n,
            k,
            r,
            s,
            w,
            a,
            b,
        }
        .loss(x, &g)
    };
    let (dx, da, db) = Naive {
        n,
        k,
        r,
        s,
        w: &w,
        a: &a,
        b: &b,
    }
    .backward(&x, &g);
    let h = 1e-6;
    let fd = |which: usize, idx: usize| {
        let (mut xp, mut ap, mut bp) = (x.clone(), a.clone(), b.clone());
        let (mut xm, mut am, mut bm) = (x.clone(), a.clone(), b.clone());
        match which {
            0 => (xp[idx] += h, xm[idx] -= h),
            1 => (ap[idx] += h, am[idx] -= h),
            _ => (bp[idx] += h, bm[idx] -= h),
        };
        (loss(&xp, &ap, &bp) - loss(&xm, &am, &bm)) / (2.0 * h)
    };
    for (which, grad) in [(0, &dx), (1, &da), (2, &db)] {
        for (i, want) in grad.iter().enumerate() {
            let got = fd(which, i);
            assert!(
                (got - want).abs() <= 1e-7 * (1.0 + want.abs()),
                "param {which} index {i}: fd {got} vs {want}"
            );
        }
    }
}

#[test]
fn cpu_backward_matches_naive_f64_and_accumulates() {
    for (seed, (m, n, k, r), base) in [
        (1, (4, 11, 13, 3), Base::Dense),
        (2, (19, 37, 70, 9), Base::Nf4(Statistics::DoubleQuant)),
        (3, (2, 64, 128, 128), Base::Dense),
    ] {
        let c = make_case(seed, m, n, k, r, 1, base, false, false);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        let dy = rand_bf16(&mut rng, m * n, 1.0);
        let l = &c.layer;
        let s = f64::from(l.adapters.scales[0]);
        let (w, a, b) = (weight_f64(l), f64s(&l.adapters.a), f64s(&l.adapters.b));
        let (dx64, da64, db64) = Naive {
            n,
            k,
            r,
            s,
            w: &w,
            a: &a,
            b: &b,
        }
        .backward(&f64s(&c.x), &f64s(&dy));
        let mut grads = LoraGrads::zeros(l);
        let dx = l
            .backward(&Device::Cpu, &c.x, &dy, m, None, &mut grads)
            .unwrap();
        // dx is bf16: 2^-8 relative plus f32 accumulation over n + r terms.
        let scale = |v: &[f64]| v.iter().fold(0f64, |a, b| a.max(b.abs()));
        let (sx, sa, sb) = (scale(&dx64), scale(&da64), scale(&db64));
        for (i, (g, w)) in dx.iter().zip(&dx64).enumerate() {
            let d = (f64::from(g.to_f32()) - w).abs();
            assert!(d <= w.abs() / 256.0 + 1e-4 * sx, "dx[{i}]: {g} vs {w}");
        }
        // dA, dB are f32 sums over m rows: 1e-4 of the largest gradient.
        for (i, (g, w)) in grads.a.iter().zip(&da64).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-4 * sa,
                "dA[{i}]: {g} vs {w}"
            );
        }
        for (i, (g, w)) in grads.b.iter().zip(&db64).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-4 * sb,
                "dB[{i}]: {g} vs {w}"
            );
        }
        // A second call adds the same gradients again (accumulation), and dx is overwritten.
        let first = grads.clone();
        let dx2 = l
            .backward(&Device::Cpu, &c.x, &dy, m, None, &mut grads)
            .unwrap();
        assert_eq!(dx, dx2);
        for (g2, g1) in grads
            .a
            .iter()
            .zip(&first.a)
            .chain(grads.b.iter().zip(&first.b))
        {
            assert!(
                (g2 - 2.0 * g1).abs() <= 1e-6 * g1.abs().max(1e-3),
                "{g2} vs 2 * {g1}"
            );
        }
    }
}

#[test]
fn multi_adapter_backward_splits_gradients_by_adapter() {
    let (m, n, k, r, na) = (6, 9, 10, 3, 2);
    let c = make_case(21, m, n, k, r, na, Base::Dense, false, true);
    let idx = c.idx.clone().unwrap(); // -1, 0, 1, -1, 0, 1
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let dy = rand_bf16(&mut rng, m * n, 1.0);
    let mut grads = LoraGrads::zeros(&c.layer);
    c.layer
        .backward(&Device::Cpu, &c.x, &dy, m, Some(&idx), &mut grads)
        .unwrap();
    let l = &c.layer;
    let w = weight_f64(l);
    for ad in 0..na {
        let rows: Vec<usize> = (0..m).filter(|&i| idx[i] == ad as i32).collect();
        let xs: Vec<f64> = rows
            .iter()
            .flat_map(|&i| f64s(&c.x[i * k..(i + 1) * k]))
            .collect();
        let gs: Vec<f64> = rows
            .iter()
            .flat_map(|&i| f64s(&dy[i * n..(i + 1) * n]))
            .collect();
        let a = f64s(&l.adapters.a[ad * r * k..(ad + 1) * r * k]);
        let b = f64s(&l.adapters.b[ad * n * r..(ad + 1) * n * r]);
        let s = f64::from(l.adapters.scales[ad]);
        let (w, a, b) = (&w, &a, &b);
        let (_, da, db) = Naive {
            n,
            k,
            r,
            s,
            w,
            a,
            b,
        }
        .backward(&xs, &gs);
        for (g, want) in grads.a[ad * r * k..(ad + 1) * r * k].iter().zip(&da) {
            assert!(
                (f64::from(*g) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "adapter {ad} dA {g} vs {want}"
            );
        }
        for (g, want) in grads.b[ad * n * r..(ad + 1) * n * r].iter().zip(&db) {
            assert!(
                (f64::from(*g) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "adapter {ad} dB {g} vs {want}"
            );
        }
    }
}

#[test]
fn merge_then_unmerge_dense_and_nf4() {
    // Dense: the merged base reproduces the adapter's output within bf16 rounding of W.
    let c = make_case(31, 5, 24, 40, 4, 2, Base::Dense, true, false);
    let mut merged = c.layer.clone();
    let err = merged.merge(1).unwrap();
    assert!(
        err > 0.0 && err <= 2f32.powi(-9) * 2.0,
        "dense merge error {err}"
    );
    let y_merged = merged
        .forward(&Device::Cpu, &c.x, 5, Some(&[-1; 5]))
        .unwrap();
    let y_lora = c
        .layer
        .forward(&Device::Cpu, &c.x, 5, Some(&[1; 5]))
        .unwrap();
    let diff = y_merged
        .iter()
        .zip(&y_lora)
        .map(|(a, b)| (a.to_f32() - b.to_f32()).abs())
        .fold(0f32, f32::max);
    let mag = y_lora.iter().fold(0f32, |a, b| a.max(b.to_f32().abs()));
    assert!(
        diff <= 0.02 * mag,
        "merged vs adapter output: {diff} (max |y| {mag})"
    );
    let err2 = merged.unmerge(1).unwrap();
    assert!(err2 <= 2f32.powi(-9) * 2.0);
    let (BaseWeight::Dense(w0), BaseWeight::Dense(w2)) = (&c.layer.weight, &merged.weight) else {
        unreachable!()
    };
    let back = w0
        .iter()
        .zip(w2)
        .map(|(a, b)| (a.to_f32() - b.to_f32()).abs())
        .fold(0f32, f32::max);
    assert!(
        back <= 2.0 * 2f32.powi(-8),
        "unmerge restores W within two bf16 roundings: {back}"
    );

    // NF4: the reported error is the true max |dequant(W') - (W + sBA)|.
    for stats in [Statistics::Plain, Statistics::DoubleQuant] {
        let c = make_case(32, 3, 16, 64, 2, 1, Base::Nf4(stats), false, false);
        let shape = c.layer.shape(1);
        let mut want = cpu::weight_f32(&shape, weight_ref(&c.layer)).unwrap();
        cpu::add_delta(&shape, lora_ref(&c.layer), 0, 1.0, &mut want).unwrap();
        let mut merged = c.layer.clone();
        let err = merged.merge(0).unwrap();
        let got = cpu::weight_f32(&shape, weight_ref(&merged)).unwrap();
        let true_err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(err, true_err);
        // NF4 rounding: at most half the widest level gap (0.152) of the block absmax, plus bf16.
        let amax = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        assert!(
            err > 0.0 && err <= 0.16 * amax,
            "nf4 merge error {err} for absmax {amax}"
        );
        let BaseWeight::Nf4(q) = &merged.weight else {
            unreachable!()
        };
        assert_eq!(q.scales.statistics(), stats);
    }
    assert!(matches!(
        c.layer.clone().merge(2),
        Err(Error::Invalid { .. })
    ));
}

fn weight_ref(l: &LoraLinear) -> WeightRef<'_> {
    match &l.weight {
        BaseWeight::Dense(w) => WeightRef::Dense(w),
        BaseWeight::Nf4(t) => WeightRef::Nf4 {
            packed: &t.packed,
            scales: t.scales.as_ref(),
            blocksize: t.blocksize,
        },
    }
}

fn lora_ref(l: &LoraLinear) -> LoraRef<'_> {
    LoraRef {
        a: &l.adapters.a,
        b: &l.adapters.b,
        scales: &l.adapters.scales,
    }
}

#[test]
fn shapes_and_indices_are_checked() {
    let c = make_case(41, 4, 8, 16, 2, 2, Base::Dense, true, false);
    let l = &c.layer;
    assert!(matches!(
        l.forward(&Device::Cpu, &c.x[1..], 4, None),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        l.forward(&Device::Cpu, &c.x, 4, Some(&[0, 1, 2, 0])),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        l.forward(&Device::Cpu, &c.x, 4, Some(&[0, 1])),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        l.forward(&Device::Cpu, &[], 0, None),
        Err(Error::Invalid { .. })
    ));
    let mut grads = LoraGrads {
        a: vec![0.0; 3],
        b: vec![],
    };
    assert!(matches!(
        l.backward(&Device::Cpu, &c.x, &[bf16::ZERO; 32], 4, None, &mut grads),
        Err(Error::Shape { .. })
    ));
    let bad = AdapterStack::new(2, vec![bf16::ZERO; 5], vec![bf16::ZERO; 16], vec![1.0]).unwrap();
    assert!(matches!(
        LoraLinear::new(8, 16, BaseWeight::Dense(vec![bf16::ZERO; 128]), None, bad),
        Err(Error::Shape { .. })
    ));
    let mut u = vec![bf16::ZERO; 3];
    let mut y = vec![bf16::ZERO; 32];
    let shape = LoraShape {
        m: 4,
        n: 8,
        k: 16,
        rank: 2,
        n_adapters: 2,
    };
    assert!(matches!(
        cpu::forward(
            &shape,
            &c.x,
            weight_ref(l),
            lora_ref(l),
            None,
            None,
            &mut u,
            &mut y,
            Accumulate::Overwrite
        ),
        Err(Error::Shape { .. })
    ));
}

// ---- CUDA against the f64 truth (and the CPU reference) ---------------------------------------

use crate::common::{cuda, test_device};

fn check_cuda(
    seed: u64,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    na: usize,
    base: Base,
    bias: bool,
    multi: bool,
) {
    let dev = cuda();
    let c = make_case(seed, m, n, k, r, na, base, bias, multi);
    let y = c.layer.forward(&dev, &c.x, m, c.idx.as_deref()).unwrap();
    let (want, tol) = naive_forward(&c, true);
    assert_close(&format!("cuda {:?}", (m, n, k, r, na)), &y, &want, &tol);
    let y_cpu = c
        .layer
        .forward(&Device::Cpu, &c.x, m, c.idx.as_deref())
        .unwrap();
    assert_close("cpu reference, same case", &y_cpu, &want, &tol);
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_gemv_dense_and_nf4_match_f64() {
    for base in [
        Base::Dense,
        Base::Nf4(Statistics::Plain),
        Base::Nf4(Statistics::DoubleQuant),
    ] {
        for m in [1, 2, 3, 5, 8, 13, 16] {
            check_cuda(
                m as u64,
                m,
                1000,
                4096,
                16,
                1,
                base,
                m.is_multiple_of(2),
                false,
            );
        }
        check_cuda(90, 7, 333, 352, 128, 3, base, true, true); // k % 32 == 0, multi-adapter
        check_cuda(93, 1, 129, 1056, 8, 1, base, false, false); // 33 runs: unrolled and tail
        check_cuda(91, 4, 77, 100, 7, 2, base, true, true); // NF4 falls back to dequantize + dense
        check_cuda(92, 3, 50, 45, 3, 1, base, false, false); // k % 8 != 0: element loads
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_gemm_dense_and_nf4_match_f64() {
    for base in [
        Base::Dense,
        Base::Nf4(Statistics::Plain),
        Base::Nf4(Statistics::DoubleQuant),
    ] {
        check_cuda(100, 17, 129, 160, 1, 1, base, true, false);
        check_cuda(101, 300, 257, 512, 64, 1, base, false, false);
        check_cuda(102, 131, 200, 96, 33, 4, base, true, true);
        check_cuda(103, 45, 70, 88, 5, 2, base, true, true); // NF4 fallback (k % 32 != 0)
        check_cuda(104, 40, 31, 37, 128, 1, base, true, false); // k % 8 != 0: element loads
        check_cuda(105, 1300, 200, 64, 8, 1, base, false, false); // 11 row tiles: two raster groups
        // Split k (plan::gemm_split): 2 tiles, 33 slices in 7 ranges (the last shorter), with
        // bias, two adapters and mixed row indices; then 2 x 1 tiles, 32 slices in 8 ranges.
        check_cuda(106, 40, 200, 1056, 8, 2, base, true, true);
        check_cuda(107, 130, 72, 1024, 5, 1, base, false, false);
    }
}

/// The rank products of `kernels/lora_rank.cu` (u on the GEMM path) at the shapes that stress
/// their tiling and split-K: R not a multiple of 16 and spread over several adapters, R wider
/// than one 64-column tile, rows not a multiple of the 64-row tile, k cut into uneven splits or
/// shorter than one 32-wide slice.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_rank_products_at_awkward_shapes_match_f64() {
    for base in [Base::Dense, Base::Nf4(Statistics::DoubleQuant)] {
        // k = 409: 13 slices of 32 in 3 splits (5 + 5 + 3), R = 3 x 7 = 21 (a 32-wide tile).
        check_cuda(110, 70, 96, 409, 7, 3, base, true, true);
        // k = 20: shorter than one slice; R = 2 x 40 = 80: two 64-wide tiles.
        check_cuda(111, 65, 33, 20, 40, 2, base, false, true);
        // k = 2048: 64 slices, 16 splits of 4 over one row tile; R = 5 (a 16-wide tile).
        check_cuda(112, 33, 40, 2048, 5, 1, base, true, false);
    }
}

/// Scratch reuse: one device, shapes that grow, shrink and grow again (u, g and the partial sums
/// are the device's, sized by the largest call so far), each result against the CPU, and the
/// same backward twice from the same gradients: bit-identical (the split sums are reduced in a
/// fixed order).
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_scratch_is_reused_and_results_are_deterministic() {
    let dev = cuda();
    for (seed, m, n, k, r, na) in [
        (120, 200, 64, 512, 32, 2),
        (121, 20, 30, 40, 3, 1),
        (122, 150, 80, 1024, 24, 3),
    ] {
        let c = make_case(seed, m, n, k, r, na, Base::Dense, true, true);
        let y = c.layer.forward(&dev, &c.x, m, c.idx.as_deref()).unwrap();
        let (want, tol) = naive_forward(&c, true);
        assert_close(&format!("reuse {:?}", (m, n, k, r, na)), &y, &want, &tol);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dy = rand_bf16(&mut rng, m * n, 1.0);
        let mut g1 = LoraGrads::zeros(&c.layer);
        let mut g2 = LoraGrads::zeros(&c.layer);
        let dx1 = c
            .layer
            .backward(&dev, &c.x, &dy, m, c.idx.as_deref(), &mut g1)
            .unwrap();
        let dx2 = c
            .layer
            .backward(&dev, &c.x, &dy, m, c.idx.as_deref(), &mut g2)
            .unwrap();
        assert_eq!(dx1, dx2, "dx differs between two identical backwards");
        assert!(
            g1.a.iter()
                .zip(&g2.a)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "dA differs between two identical backwards"
        );
        assert!(
            g1.b.iter()
                .zip(&g2.b)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "dB differs between two identical backwards"
        );
    }
}

/// The layer with every value replaced by its absolute value (NF4 weights by their dequantized
/// magnitudes): its CPU backward bounds the size of every sum the real backward forms.
fn magnitude_layer(l: &LoraLinear) -> LoraLinear {
    let abs = |v: &[bf16]| {
        v.iter()
            .map(|x| bf16::from_f32(x.to_f32().abs()))
            .collect::<Vec<_>>()
    };
    let w: Vec<bf16> = weight_f64(l)
        .iter()
        .map(|v| bf16::from_f64(v.abs()))
        .collect();
    let mut m = l.clone();
    m.weight = BaseWeight::Dense(w);
    m.adapters.a = abs(&l.adapters.a);
    m.adapters.b = abs(&l.adapters.b);
    m.adapters.scales = l.adapters.scales.iter().map(|s| s.abs()).collect();
    m
}

fn check_cuda_backward(
    seed: u64,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    na: usize,
    base: Base,
    multi: bool,
) {
    check_cuda_backward_on(&cuda(), seed, m, n, k, r, na, base, multi);
}

/// The CUDA backward on `dev` against the CPU reference: dx within 2^-7 of the magnitude sum,
/// dA and dB (added to pre-filled gradients) likewise.
fn check_cuda_backward_on(
    dev: &Device,
    seed: u64,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    na: usize,
    base: Base,
    multi: bool,
) {
    let c = make_case(seed, m, n, k, r, na, base, false, multi);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let dy = rand_bf16(&mut rng, m * n, 1.0);
    let idx = c.idx.as_deref();
    // Pre-filled gradients: the kernels must add to them.
    let prefill = |len: usize| {
        (0..len)
            .map(|i| (i % 7) as f32 * 0.5 - 1.5)
            .collect::<Vec<f32>>()
    };
    let fresh = LoraGrads::zeros(&c.layer);
    let mut g_gpu = LoraGrads {
        a: prefill(fresh.a.len()),
        b: prefill(fresh.b.len()),
    };
    let mut g_cpu = LoraGrads {
        a: prefill(fresh.a.len()),
        b: prefill(fresh.b.len()),
    };
    let dx_gpu = c
        .layer
        .backward(dev, &c.x, &dy, m, idx, &mut g_gpu)
        .unwrap();
    let dx_cpu = c
        .layer
        .backward(&Device::Cpu, &c.x, &dy, m, idx, &mut g_cpu)
        .unwrap();
    let abs_x: Vec<bf16> =
        c.x.iter()
            .map(|v| bf16::from_f32(v.to_f32().abs()))
            .collect();
    let abs_dy: Vec<bf16> = dy
        .iter()
        .map(|v| bf16::from_f32(v.to_f32().abs()))
        .collect();
    let mut mag = LoraGrads::zeros(&c.layer);
    let mag_dx = magnitude_layer(&c.layer)
        .backward(&Device::Cpu, &abs_x, &abs_dy, m, idx, &mut mag)
        .unwrap();
    // The GPU rounds g = s dy B and u = s x A^T to bf16 (2^-9 relative each) and dx to bf16;
    // 2^-7 of the magnitude sum covers both roundings with margin.
    let what = format!("{:?}", (m, n, k, r, na));
    for (i, ((gp, cp), mg)) in dx_gpu.iter().zip(&dx_cpu).zip(&mag_dx).enumerate() {
        let d = (gp.to_f32() - cp.to_f32()).abs();
        assert!(
            d <= mg.to_f32() / 128.0 + 1e-5,
            "{what} dx[{i}]: {gp} vs {cp} (magnitude {mg})"
        );
    }
    for (name, gp, cp, mg) in [
        ("dA", &g_gpu.a, &g_cpu.a, &mag.a),
        ("dB", &g_gpu.b, &g_cpu.b, &mag.b),
    ] {
        for (i, ((a, b), mg)) in gp.iter().zip(cp.iter()).zip(mg.iter()).enumerate() {
            assert!(
                (a - b).abs() <= mg / 128.0 + 1e-5,
                "{what} {name}[{i}]: {a} vs {b} (magnitude {mg})"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_backward_dense_and_nf4_match_cpu() {
    for base in [
        Base::Dense,
        Base::Nf4(Statistics::Plain),
        Base::Nf4(Statistics::DoubleQuant),
    ] {
        check_cuda_backward(200, 1, 300, 256, 8, 1, base, false);
        check_cuda_backward(201, 130, 257, 384, 16, 1, base, false);
        check_cuda_backward(202, 77, 200, 160, 33, 3, base, true);
        check_cuda_backward(203, 45, 70, 88, 5, 2, base, true); // NF4: dequantize-first fallback
        check_cuda_backward(204, 19, 37, 45, 128, 1, base, false); // odd n and k: element loads
        check_cuda_backward(207, 1300, 40, 160, 8, 1, base, false); // two raster groups
        // The dx GEMM's split n (plan::gemm_split): 2 dx tiles, 33 slices of n in 7 ranges (the
        // last shorter), two adapters and mixed rows; then 2 x 1 tiles, 32 slices in 8 ranges.
        check_cuda_backward(208, 40, 1056, 192, 8, 2, base, true);
        check_cuda_backward(209, 130, 1024, 96, 5, 1, base, false);
        // Split rank products: m = 333 (11 slices of rows: dA and dB in 2 uneven splits), n = 421
        // (g: 14 slices, 3 uneven splits), k = 20 (u: shorter than one slice), R = 3 x 7.
        check_cuda_backward(205, 333, 421, 20, 7, 3, base, true);
        // R = 80: two 64-wide tiles for every rank product, k = 8 x 32 in 2 splits.
        check_cuda_backward(206, 70, 50, 256, 40, 2, base, true);
    }
}

/// The base-only calls of `CudaLoraLinear` (frozen projections, adapters switched off) equal the
/// full calls with every row's index -1, and launch no LoRA kernel at all (counted on the
/// virtual device; a real GPU checks the values only).
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_base_only_calls_run_no_lora_kernel() {
    let (_exclusive, dev) = crate::common::counting();
    for (m, base) in [
        (3, Base::Dense),
        (40, Base::Dense),
        (40, Base::Nf4(Statistics::Plain)),
    ] {
        let (n, k) = (48, 64);
        let c = make_case(130 + m as u64, m, n, k, 8, 2, base, true, false);
        let layer = qadapt::lora::CudaLoraLinear::upload(&dev, &c.layer).unwrap();
        let x = dev.upload(&c.x).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(131);
        let dy = dev.upload(&rand_bf16(&mut rng, m * n, 1.0)).unwrap();
        let none = dev.upload(&vec![-1i32; m]).unwrap();
        let mut y_ref = dev.zeros::<bf16>(m * n).unwrap();
        let mut dx_ref = dev.zeros::<bf16>(m * k).unwrap();
        let mut ga = dev.zeros::<f32>(2 * 8 * k).unwrap();
        let mut gb = dev.zeros::<f32>(2 * n * 8).unwrap();
        layer
            .forward(
                &x,
                m,
                &mut y_ref,
                Accumulate::Overwrite,
                LoraTerm::adapted(Some(&none)),
            )
            .unwrap();
        layer
            .backward(
                &x,
                &dy,
                m,
                &mut dx_ref,
                Accumulate::Overwrite,
                LoraBackTerm::adapted(Some(&none), (&mut ga, &mut gb)),
            )
            .unwrap();
        dev.reset_emulator_counters();
        let mut y = dev.zeros::<bf16>(m * n).unwrap();
        let mut dx = dev.zeros::<bf16>(m * k).unwrap();
        layer
            .forward(&x, m, &mut y, Accumulate::Overwrite, LoraTerm::Base)
            .unwrap();
        layer
            .backward(
                &x,
                &dy,
                m,
                &mut dx,
                Accumulate::Overwrite,
                LoraBackTerm::Base,
            )
            .unwrap();
        assert_eq!(dev.download(&y).unwrap(), dev.download(&y_ref).unwrap());
        assert_eq!(dev.download(&dx).unwrap(), dev.download(&dx_ref).unwrap());
        for kernel in qadapt_kernels::KERNELS {
            let is_lora_product = kernel.module == "lora_rank" || kernel.name == "lora_xa_bf16";
            if let Some((launches, _)) = dev.emulator_counters(*kernel) {
                assert!(
                    !is_lora_product || launches == 0,
                    "{} launched {launches} times by a base-only call",
                    kernel.name
                );
            }
        }
    }
}

/// The truth and tolerance of a forward added into `y0` (`Accumulate::Add`): y0 + want, within
/// the forward's tolerance plus the old value's share of the one bf16 rounding.
fn added_to(want: &[f64], tol: &[f64], y0: &[bf16]) -> (Vec<f64>, Vec<f64>) {
    let want: Vec<f64> = want
        .iter()
        .zip(y0)
        .map(|(w, o)| w + f64::from(o.to_f32()))
        .collect();
    let tol = tol
        .iter()
        .zip(&want)
        .map(|(t, w)| t + w.abs() / 256.0)
        .collect();
    (want, tol)
}

/// `Accumulate::Add` adds the forward into `y` in the kernels' epilogue (the residual add of a
/// sublayer, no temporary): on every path (gemv, wide gemv, GEMM with and without split k, NF4
/// streamed and dequantized first) the device and the CPU reference give `y0 + x W^T + LoRA`
/// within the forward's tolerance plus the old value's share of the one rounding, and
/// `Overwrite` ignores what `y` held.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_forward_accumulates_into_y_in_the_epilogue() {
    let dev = crate::common::cuda_device();
    let cases = [
        (3, 96, 64, Base::Dense),
        (12, 96, 64, Base::Nf4(Statistics::DoubleQuant)),
        (40, 200, 1056, Base::Dense),
        (300, 64, 96, Base::Nf4(Statistics::Plain)),
        (40, 48, 40, Base::Nf4(Statistics::DoubleQuant)),
    ];
    for (i, &(m, n, k, base)) in cases.iter().enumerate() {
        let tag = format!("m {m} n {n} k {k} {base:?}");
        let c = make_case(170 + i as u64, m, n, k, 8, 2, base, true, true);
        let mut rng = ChaCha8Rng::seed_from_u64(171 + i as u64);
        let y0 = rand_bf16(&mut rng, m * n, 2.0);
        let (want, tol) = naive_forward(&c, true);
        let (want, tol) = added_to(&want, &tol, &y0);
        let d = c.upload(&dev);
        let (layer, x, idx) = (&d.layer, &d.x, &d.idx);
        let mut y = dev.upload(&y0).unwrap();
        d.forward(&mut y, Accumulate::Add).unwrap();
        assert_close(
            &format!("cuda add, {tag}"),
            &dev.download(&y).unwrap(),
            &want,
            &tol,
        );
        let mut y_cpu = y0.clone();
        let mut u = vec![bf16::ZERO; m * c.layer.shape(m).r_total()];
        cpu::forward(
            &c.layer.shape(m),
            &c.x,
            weight_ref(&c.layer),
            lora_ref(&c.layer),
            c.idx.as_deref(),
            c.layer.bias.as_deref(),
            &mut u,
            &mut y_cpu,
            Accumulate::Add,
        )
        .unwrap();
        assert_close(&format!("cpu add, {tag}"), &y_cpu, &want, &tol);
        // Overwrite: what y held does not matter.
        let mut y = dev.upload(&y0).unwrap();
        d.forward(&mut y, Accumulate::Overwrite).unwrap();
        let fresh = c
            .layer
            .forward(&Device::Cpu, &c.x, m, c.idx.as_deref())
            .unwrap();
        let (plain, ptol) = naive_forward(&c, true);
        assert_close(
            &format!("cuda overwrite, {tag}"),
            &dev.download(&y).unwrap(),
            &plain,
            &ptol,
        );
        assert_close(&format!("cpu overwrite, {tag}"), &fresh, &plain, &ptol);
        // The backward adds into dx the same way: the device and the CPU reference each give
        // their own overwriting result plus the old dx, to one rounding of the sum.
        let dy = rand_bf16(&mut rng, m * n, 1.0);
        let dx0 = rand_bf16(&mut rng, m * k, 2.0);
        let (na, r) = (c.layer.adapters.len(), c.layer.adapters.rank);
        let dyd = dev.upload(&dy).unwrap();
        let mut ga = dev.zeros::<f32>(na * r * k).unwrap();
        let mut gb = dev.zeros::<f32>(na * n * r).unwrap();
        let mut dx_ow = dev.zeros::<bf16>(m * k).unwrap();
        let idx_d = idx.as_ref();
        let g = (&mut ga, &mut gb);
        layer
            .backward(
                x,
                &dyd,
                m,
                &mut dx_ow,
                Accumulate::Overwrite,
                LoraBackTerm::adapted(idx_d, g),
            )
            .unwrap();
        let mut dx_add = dev.upload(&dx0).unwrap();
        let g = (&mut ga, &mut gb);
        layer
            .backward(
                x,
                &dyd,
                m,
                &mut dx_add,
                Accumulate::Add,
                LoraBackTerm::adapted(idx_d, g),
            )
            .unwrap();
        let (ow, add) = (
            dev.download(&dx_ow).unwrap(),
            dev.download(&dx_add).unwrap(),
        );
        let cpu_dx = |acc: Accumulate| {
            let mut dx = if acc == Accumulate::Add {
                dx0.clone()
            } else {
                vec![bf16::ZERO; m * k]
            };
            let (mut ga, mut gb) = (vec![0f32; na * r * k], vec![0f32; na * n * r]);
            cpu::backward(
                &c.layer.shape(m),
                &c.x,
                weight_ref(&c.layer),
                lora_ref(&c.layer),
                c.idx.as_deref(),
                &dy,
                &mut dx,
                &mut ga,
                &mut gb,
                acc,
            )
            .unwrap();
            dx
        };
        let (cpu_ow, cpu_add) = (cpu_dx(Accumulate::Overwrite), cpu_dx(Accumulate::Add));
        for (what, o, a) in [("cuda", &ow, &add), ("cpu", &cpu_ow, &cpu_add)] {
            let want: Vec<f64> = o
                .iter()
                .zip(&dx0)
                .map(|(o, d)| f64::from(o.to_f32()) + f64::from(d.to_f32()))
                .collect();
            // The overwriting result was rounded once already: two bf16 roundings apart.
            let tol: Vec<f64> = o
                .iter()
                .zip(&want)
                .map(|(o, w)| (f64::from(o.to_f32()).abs() + w.abs()) / 128.0 + 1e-6)
                .collect();
            assert_close(&format!("{what} dx add, {tag}"), a, &want, &tol);
        }
    }
}

/// The device alone (its launches are counted), which must be compute capability 9.0 with the
/// sm_90a kernels on.
fn hopper_device() -> (
    std::sync::RwLockWriteGuard<'static, ()>,
    qadapt::cuda::CudaDevice,
) {
    let (exclusive, dev) = crate::common::counting();
    assert_eq!(
        dev.props().compute_capability,
        (9, 0),
        "the sm_90a kernels need a compute capability 9.0 device"
    );
    assert!(dev.hopper_kernels(), "QADAPT_SM90A=0 turned them off");
    (exclusive, dev)
}

/// On the virtual device, of the launches since the counters were reset: one of `sm90` and
/// none of `sm80` when `hopper`, the other way round otherwise (a real GPU counts nothing).
fn assert_which_ran(
    dev: &qadapt::cuda::CudaDevice,
    hopper: bool,
    sm90: qadapt_kernels::KernelName,
    sm80: qadapt_kernels::KernelName,
    tag: &str,
) {
    if let Some((launches, _)) = dev.emulator_counters(sm90) {
        assert_eq!(launches, u64::from(hopper), "{} launches, {tag}", sm90.name);
        let other = dev.emulator_counters(sm80).map_or(0, |c| c.0);
        assert_eq!(other, u64::from(!hopper), "{} launches, {tag}", sm80.name);
    }
}

/// The sm_90a NF4 GEMM (`kernels/lora_sm90.cu`: TMA boxes on mbarriers, wgmma with W decoded in
/// registers, the LoRA term as extra k steps over u): on a compute capability 9.0 device it is
/// the NF4 y GEMM wherever `plan::lora_sm90` allows. At shapes with ragged row and feature tiles,
/// block sizes 64 and 128, plain and double-quant scales, one to three adapters (R = 8, 32 and
/// 72: one LoRA step, a partial one, two), mixed row indices, bias, and both tile widths, it
/// matches the f64 truth, and so does the sm_80 kernel on the same cases with the Hopper kernels
/// turned off. On the virtual device the launch counts show which kernel ran.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_sm90_nf4_gemm_matches_f64_and_the_sm80_kernel() {
    use qadapt_kernels::kernels;
    let (_exclusive, dev) = hopper_device();
    // (seed: block size 32 << (seed % 3), m, n, k, r, adapters, statistics, bias, mixed rows,
    // the tile width plan::lora_sm90 picks on 132 SMs)
    let cases = [
        (
            301,
            1000,
            1160,
            192,
            16,
            2,
            Statistics::DoubleQuant,
            true,
            true,
            128,
        ),
        (
            302,
            600,
            2048,
            128,
            24,
            3,
            Statistics::Plain,
            true,
            true,
            128,
        ),
        (
            304,
            2300,
            1928,
            64,
            8,
            1,
            Statistics::DoubleQuant,
            false,
            false,
            256,
        ),
    ];
    for (seed, m, n, k, r, na, stats, bias, multi, bn) in cases {
        let tag = format!("m {m} n {n} k {k} r {r} x {na} {stats:?}");
        let c = make_case(seed, m, n, k, r, na, Base::Nf4(stats), bias, multi);
        let (want, tol) = naive_forward(&c, true);
        let d = c.upload(&dev);
        let sm90 = if bn == 256 {
            kernels::LORA_GEMM_NF4_SM90_BN256_BF16
        } else {
            kernels::LORA_GEMM_NF4_SM90_BN128_BF16
        };
        for hopper in [true, false] {
            dev.set_hopper_kernels(hopper).unwrap();
            dev.reset_emulator_counters();
            let mut y = dev.zeros::<bf16>(m * n).unwrap();
            d.forward(&mut y, Accumulate::Overwrite).unwrap();
            let got = dev.download(&y).unwrap();
            assert_close(&format!("hopper {hopper}, {tag}"), &got, &want, &tol);
            assert_which_ran(&dev, hopper, sm90, kernels::LORA_GEMM_NF4_BF16, &tag);
        }
        dev.set_hopper_kernels(true).unwrap();
        // Accumulate::Add: the old y joins bias and the product before the one rounding.
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
        let y0 = rand_bf16(&mut rng, m * n, 2.0);
        let mut y = dev.upload(&y0).unwrap();
        d.forward(&mut y, Accumulate::Add).unwrap();
        let (want_add, tol_add) = added_to(&want, &tol, &y0);
        assert_close(
            &format!("hopper add, {tag}"),
            &dev.download(&y).unwrap(),
            &want_add,
            &tol_add,
        );
    }
}

/// The sm_90a NF4 dx GEMM (`kernels/lora_sm90.cu`: dx^T = [W^T | Acat^T] [dy | g]^T, W^T decoded
/// in registers from 64-row code boxes, block scales staged by the producer warp): on a compute
/// capability 9.0 device it is the dx GEMM wherever `plan::lora_sm90_dx` allows. At ragged row
/// and feature tiles, block sizes 64 and 128, both scale kinds, R = 8, 32 and 72 (two LoRA steps)
/// with mixed adapter rows, and both tile widths, dx, dA and dB match the CPU reference, and so
/// do the sm_80 kernel's on the same cases; on the virtual device the launch counts show which
/// kernel ran.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_sm90_nf4_dx_matches_the_cpu_and_the_sm80_kernel() {
    use qadapt_kernels::kernels;
    let (_exclusive, cd) = hopper_device();
    let dev = Device::Cuda(cd.clone());
    // (seed: block size 32 << (seed % 3), m, n, k, r, adapters, statistics, mixed rows, the tile
    // width plan::lora_sm90_dx picks on 132 SMs)
    let cases = [
        (
            401,
            1000,
            192,
            1152,
            16,
            2,
            Statistics::DoubleQuant,
            true,
            128,
        ),
        (403, 2300, 128, 2048, 8, 1, Statistics::Plain, false, 256),
        (
            404,
            600,
            64,
            2048,
            24,
            3,
            Statistics::DoubleQuant,
            true,
            128,
        ),
    ];
    for (seed, m, n, k, r, na, stats, multi, bn) in cases {
        let sm90 = if bn == 256 {
            kernels::LORA_GEMM_BWD_DX_NF4_SM90_BN256_BF16
        } else {
            kernels::LORA_GEMM_BWD_DX_NF4_SM90_BN128_BF16
        };
        for hopper in [true, false] {
            cd.set_hopper_kernels(hopper).unwrap();
            cd.reset_emulator_counters();
            check_cuda_backward_on(&dev, seed, m, n, k, r, na, Base::Nf4(stats), multi);
            let tag = format!("dx, m {m} n {n} k {k}");
            assert_which_ran(&cd, hopper, sm90, kernels::LORA_GEMM_BWD_DX_NF4_BF16, &tag);
        }
    }
    cd.set_hopper_kernels(true).unwrap();
}

/// A forward that keeps u = s x A^T leaves it for a backward that then forms no u of its own: on
/// the gemv path (u from `lora_xa_bf16`) and the GEMM path (from the rank product), dense and
/// NF4, several adapters with mixed rows, the kept backward's dx, dA and dB equal the
/// recomputing backward's (the same u either way, up to the order of its f32 sums: within the
/// backward's tolerance), and on the virtual device it launches no `lora_rank_xa_bf16`. A kept u
/// of the wrong length is a shape error.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_backward_from_the_kept_u_skips_the_xa_product() {
    use qadapt_kernels::kernels;
    let (_exclusive, dev) = crate::common::counting();
    for (seed, m, n, k, base) in [
        (501, 5, 96, 128, Base::Dense),
        (502, 40, 200, 256, Base::Nf4(Statistics::DoubleQuant)),
        (503, 300, 136, 192, Base::Nf4(Statistics::Plain)),
    ] {
        let tag = format!("m {m} n {n} k {k} {base:?}");
        let c = make_case(seed, m, n, k, 8, 2, base, false, true);
        let d = c.upload(&dev);
        let (layer, x, idx) = (&d.layer, &d.x, &d.idx);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
        let dy = dev.upload(&rand_bf16(&mut rng, m * n, 1.0)).unwrap();
        let (y_plain, y_kept) = (
            &mut dev.zeros::<bf16>(m * n).unwrap(),
            &mut dev.zeros::<bf16>(m * n).unwrap(),
        );
        let mut u = dev.zeros::<bf16>(layer.kept_len(m)).unwrap();
        // The kept path first: the device's own u scratch then holds nothing of this case (zeros,
        // or the previous case's), so a backward that read it instead of the kept u would fail.
        layer
            .forward(
                x,
                m,
                y_kept,
                Accumulate::Overwrite,
                LoraTerm::Adapted {
                    adapter_idx: idx.as_ref(),
                    keep: Some(&mut u),
                },
            )
            .unwrap();
        let run = |kept: bool| {
            let mut dx = dev.zeros::<bf16>(m * k).unwrap();
            let mut ga = dev.zeros::<f32>(2 * 8 * k).unwrap();
            let mut gb = dev.zeros::<f32>(2 * n * 8).unwrap();
            dev.reset_emulator_counters();
            let term = LoraBackTerm::Adapted {
                adapter_idx: idx.as_ref(),
                kept: kept.then_some(&u),
                grads: (&mut ga, &mut gb),
            };
            layer
                .backward(x, &dy, m, &mut dx, Accumulate::Overwrite, term)
                .unwrap();
            let xa = dev
                .emulator_counters(kernels::LORA_RANK_XA_BF16)
                .map(|c| c.0);
            let out = (
                dev.download(&dx).unwrap(),
                dev.download(&ga).unwrap(),
                dev.download(&gb).unwrap(),
            );
            (out, xa)
        };
        let ((dx1, ga1, gb1), xa1) = run(true);
        d.forward(y_plain, Accumulate::Overwrite).unwrap();
        assert_eq!(
            dev.download(y_kept).unwrap(),
            dev.download(y_plain).unwrap(),
            "{tag}: the kept forward's y"
        );
        let ((dx0, ga0, gb0), xa0) = run(false);
        if let (Some(xa0), Some(xa1)) = (xa0, xa1) {
            assert_eq!((xa0, xa1), (1, 0), "{tag}: u products (recomputed, kept)");
        }
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-2 * a.abs().max(b.abs()) + 1e-3;
        for (i, (a, b)) in dx0.iter().zip(&dx1).enumerate() {
            assert!(close(a.to_f32(), b.to_f32()), "{tag}: dx[{i}] {a} vs {b}");
        }
        for (what, g0, g1) in [("dA", &ga0, &ga1), ("dB", &gb0, &gb1)] {
            for (i, (a, b)) in g0.iter().zip(g1).enumerate() {
                assert!(close(*a, *b), "{tag}: {what}[{i}] {a} vs {b}");
            }
        }
        // A kept u of another length.
        let short = dev.zeros::<bf16>(layer.kept_len(m) - 1).unwrap();
        let mut dx = dev.zeros::<bf16>(m * k).unwrap();
        let (mut ga, mut gb) = (
            dev.zeros::<f32>(2 * 8 * k).unwrap(),
            dev.zeros::<f32>(2 * n * 8).unwrap(),
        );
        let term = LoraBackTerm::Adapted {
            adapter_idx: idx.as_ref(),
            kept: Some(&short),
            grads: (&mut ga, &mut gb),
        };
        let e = layer
            .backward(x, &dy, m, &mut dx, Accumulate::Overwrite, term)
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{tag}: {e}");
    }
}
