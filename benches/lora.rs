//! Fused LoRA linear forward/backward.
//!
//! CPU (criterion): the fused reference (`x W^T + s (x A^T) B^T` summed before one bf16 store)
//! against the unfused sequence (base matmul, rounded; `x A^T`, rounded; `(s t) B^T`; add), for a
//! dense and an NF4 2048 x 2048 weight at 1, 16 and 256 rows, plus the backward at 256 rows.
//! CUDA (when a device is present): the fused NF4 kernels against the dense cuBLAS GEMM and the
//! unfused path in the same run (see `cuda_table`); without a device it prints why it is skipped.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group};
use half::bf16;
use qadapt::lora::{
    AdapterStack, BaseWeight, CudaLoraLinear, LoraBackTerm, LoraGrads, LoraLinear, LoraRef,
    LoraTerm, WeightRef, cpu,
};
use qadapt::nf4::{Nf4Tensor, Statistics};
use qadapt::ops::Accumulate;
use qadapt::{Device, FloatVec};
use qadapt_suite::{bench_smoke, randn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

fn layer(n: usize, k: usize, r: usize, nf4: bool) -> LoraLinear {
    let w = randn(n * k, 0.02, 1);
    let weight = if nf4 {
        BaseWeight::Nf4(
            Nf4Tensor::quantize(
                &Device::Cpu,
                &FloatVec::F32(w),
                &[n, k],
                64,
                Statistics::DoubleQuant,
            )
            .unwrap(),
        )
    } else {
        BaseWeight::Dense(bf(&w))
    };
    let adapters = AdapterStack::new(
        r,
        bf(&randn(r * k, 0.02, 2)),
        bf(&randn(n * r, 0.02, 3)),
        vec![2.0],
    )
    .unwrap();
    LoraLinear::new(n, k, weight, None, adapters).unwrap()
}

fn cpu_benches(c: &mut Criterion) {
    let (n, k, r) = (2048usize, 2048usize, 16usize);
    let mut g = c.benchmark_group("lora_cpu");
    g.sample_size(10);
    for nf4 in [false, true] {
        let l = layer(n, k, r, nf4);
        let kind = if nf4 { "nf4" } else { "dense" };
        for m in [1usize, 16, 256] {
            let x = bf(&randn(m * k, 1.0, 4));
            g.bench_with_input(BenchmarkId::new(format!("fused_{kind}"), m), &m, |b, &m| {
                b.iter(|| l.forward(&Device::Cpu, black_box(&x), m, None).unwrap())
            });
            g.bench_with_input(
                BenchmarkId::new(format!("unfused_{kind}"), m),
                &m,
                |b, &m| {
                    let shape = l.shape(m);
                    let w = match &l.weight {
                        BaseWeight::Dense(w) => WeightRef::Dense(w),
                        BaseWeight::Nf4(t) => WeightRef::Nf4 {
                            packed: &t.packed,
                            scales: t.scales.as_ref(),
                            blocksize: t.blocksize,
                        },
                    };
                    let lora = LoraRef {
                        a: &l.adapters.a,
                        b: &l.adapters.b,
                        scales: &l.adapters.scales,
                    };
                    let mut y = vec![bf16::ZERO; m * n];
                    b.iter(|| cpu::forward_unfused(&shape, black_box(&x), w, lora, &mut y).unwrap())
                },
            );
        }
        let m = 256;
        let x = bf(&randn(m * k, 1.0, 5));
        let dy = bf(&randn(m * n, 1.0, 6));
        let mut grads = LoraGrads::zeros(&l);
        g.bench_function(BenchmarkId::new(format!("backward_{kind}"), m), |b| {
            b.iter(|| {
                l.backward(&Device::Cpu, black_box(&x), &dy, m, None, &mut grads)
                    .unwrap()
            })
        });
    }
    g.finish();
}

/// The CUDA table; prints why it is skipped without a device.
/// Uniform values in [-scale, scale) from the ChaCha8 stream of `seed`, rounded to bf16.
/// Times `f` with the sm_90a kernels on, then off, when `sm90` (their plan takes this shape);
/// else once, as the device is set. Leaves the device as it found it.
fn time_paths(
    dev: &qadapt::cuda::CudaDevice,
    sm90: bool,
    iters: usize,
    mut f: impl FnMut() -> qadapt::Result<()>,
) -> Vec<(bool, f64)> {
    let was = dev.hopper_kernels();
    let paths: &[bool] = if sm90 { &[true, false] } else { &[was] };
    let times = paths
        .iter()
        .map(|&on| {
            dev.set_hopper_kernels(on).unwrap();
            (on, dev.time_ms(iters, &mut f).unwrap())
        })
        .collect();
    dev.set_hopper_kernels(was).unwrap();
    times
}

fn uniform(n: usize, scale: f32, seed: u64) -> Vec<bf16> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| bf16::from_f32(scale * rng.random_range(-1.0f32..1.0)))
        .collect()
}

/// The CUDA table: the fused NF4 + LoRA forward against, in the same run, the dense bf16 cuBLAS
/// GEMM of the same shape and the unfused bitsandbytes-style path (dequantize kernel, cuBLAS base
/// GEMM, two cuBLAS LoRA GEMMs, the add folded into the second one's beta = 1, which favours the
/// baseline), at the Llama-3-8B projection shapes (q/o 4096 x 4096, k/v 1024 x 4096, gate/up
/// 14336 x 4096, down 4096 x 14336), 1, 16, 128, 512 and 4096 rows, r = 16 and 64; and the
/// backward (dx, dA, dB) at 128 rows and more against its unfused path. The `goal` column says
/// whether the fused kernel is within 1.2x of dense cuBLAS and at least 1.5x faster than the
/// unfused path (goals: BENCHMARKS.md). Weight GB/s (gemv rows) is read against the device-to-device
/// copy bandwidth of the same run.
fn cuda_table() {
    use qadapt::cuda::Op;
    use qadapt::nf4::{CudaNf4, Scales};
    let dev = match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        Ok(_) => unreachable!(),
        Err(e) => {
            println!("lora CUDA benches skipped: {e}");
            return;
        }
    };
    if let Err(e) = dev.gemm_bf16(
        &dev.zeros::<bf16>(1).unwrap(),
        Op::N,
        &dev.zeros::<bf16>(1).unwrap(),
        Op::N,
        &mut dev.zeros::<bf16>(1).unwrap(),
        (1, 1, 1),
        1.0,
        0.0,
    ) {
        println!("lora CUDA benches skipped: {e}");
        return;
    }
    // Smoke (QADAPT_BENCH_SMOKE=1): one small awkward shape, one timed call each, so every CUDA
    // branch runs on the virtual device; the numbers mean nothing.
    let smoke = bench_smoke();
    let hopper = dev.hopper_kernels();
    let iters = |n: usize| if smoke { 1 } else { n };
    if smoke {
        println!("\nSMOKE RUN (QADAPT_BENCH_SMOKE=1): tiny shapes, times mean nothing");
    }
    let copy_bytes = if smoke { 1usize << 20 } else { 1usize << 30 };
    let src = dev.zeros::<u8>(copy_bytes / 2).unwrap();
    let mut dst = dev.zeros::<u8>(copy_bytes / 2).unwrap();
    let copy_gbs =
        copy_bytes as f64 / dev.time_ms(iters(20), || dev.copy(&src, &mut dst)).unwrap() / 1e6;
    drop((src, dst));
    println!(
        "\nLoRA forward on {}; device copy {copy_gbs:.0} GB/s (read + write)",
        dev.describe()
    );
    println!(
        "| kernel | m | n x k | r | fused ms | cuBLAS dense ms | unfused ms | rate | vs cuBLAS | vs unfused | goal |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // Within 1.2x of dense cuBLAS and at least 1.5x faster than dequantize + cuBLAS.
    let goal = |f: f64, d: f64, u: f64| {
        if f <= 1.2 * d && u >= 1.5 * f {
            "met"
        } else {
            "missed"
        }
    };
    let s = 2.0f32;
    let shapes: &[(usize, usize)] = if smoke {
        &[(136, 96)]
    } else {
        &[(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
    };
    let rows: &[usize] = if smoke {
        &[1, 8, 40, 130]
    } else {
        &[1, 16, 128, 512, 4096]
    };
    // The backward at training sizes (the smoke run: its GEMM-path row counts).
    let bwd_min_rows = if smoke { 17 } else { 128 };
    for &(n, k) in shapes {
        let w = dev.upload(&uniform(n * k, 0.05, 1)).unwrap();
        let q = CudaNf4::quantize(&dev, &w, 64, Statistics::DoubleQuant).unwrap();
        let (packed, scales) = q.to_host(&dev).unwrap();
        let host_q = Nf4Tensor {
            shape: vec![n, k],
            dtype: qadapt::DType::BF16,
            blocksize: 64,
            packed,
            scales,
        };
        let scale_bytes = match &host_q.scales {
            Scales::Absmax(a) => 4 * a.len(),
            Scales::Double(d) => d.codes.len() + 4 * d.nested_absmax.len(),
        };
        let mut wdq = dev.zeros::<bf16>(n * k).unwrap();
        for r in [16usize, 64] {
            let a = uniform(r * k, 0.05, 2);
            let b = uniform(n * r, 0.05, 3);
            let adapters = AdapterStack::new(r, a.clone(), b.clone(), vec![s]).unwrap();
            let layer =
                LoraLinear::new(n, k, BaseWeight::Nf4(host_q.clone()), None, adapters).unwrap();
            let fused = CudaLoraLinear::upload(&dev, &layer).unwrap();
            let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            for &m in rows {
                let x = dev.upload(&uniform(m * k, 1.0, 4)).unwrap();
                let mut y = dev.zeros::<bf16>(m * n).unwrap();
                let mut t = dev.zeros::<bf16>(m * r).unwrap();
                let iters = iters(if m <= 16 { 200 } else { 20 });
                // On a compute capability 9.0 device the NF4 GEMM rows are timed twice: with the
                // sm_90a kernel (where plan::lora_sm90 picks it) and with the sm_80 kernel.
                let sm90 = qadapt::plan::lora_sm90(
                    m as u64,
                    n as u64,
                    k as u64,
                    r as u64,
                    64,
                    &dev.props(),
                )
                .filter(|_| hopper);
                let f_ms = time_paths(&dev, sm90.is_some(), iters, || {
                    fused.forward(
                        &x,
                        m,
                        &mut y,
                        Accumulate::Overwrite,
                        LoraTerm::adapted(None),
                    )
                });
                let d_ms = dev
                    .time_ms(iters, || {
                        dev.gemm_bf16(&x, Op::N, &w, Op::T, &mut y, (m, n, k), 1.0, 0.0)
                    })
                    .unwrap();
                let u_ms = dev
                    .time_ms(iters, || {
                        q.dequantize_into(&dev, &mut wdq)?;
                        dev.gemm_bf16(&x, Op::N, &wdq, Op::T, &mut y, (m, n, k), 1.0, 0.0)?;
                        dev.gemm_bf16(&x, Op::N, &da, Op::T, &mut t, (m, r, k), 1.0, 0.0)?;
                        dev.gemm_bf16(&t, Op::N, &db, Op::T, &mut y, (m, n, r), s, 1.0)
                    })
                    .unwrap();
                for &(on, f_ms) in &f_ms {
                    let rate = if m <= 16 {
                        let gbs = (n * k / 2 + scale_bytes) as f64 / f_ms / 1e6;
                        format!(
                            "{gbs:.0} GB/s weights ({:.0}% of copy)",
                            100.0 * gbs / copy_gbs
                        )
                    } else {
                        format!(
                            "{:.0} TFLOP/s",
                            2.0 * (m * n * k + m * r * (n + k)) as f64 / f_ms / 1e9
                        )
                    };
                    // Which y kernel ran: the sm_90a one only past the gemv rows and where its
                    // plan allows (it falls back to the sm_80 kernels otherwise).
                    let kernel = match sm90 {
                        Some(p) if on => format!("lora_gemm_nf4_sm90_bn{}_bf16", p.bn),
                        _ => "lora_*_nf4_bf16".to_owned(),
                    };
                    println!(
                        "| {kernel} | {m} | {n} x {k} | {r} | {f_ms:.4} | {d_ms:.4} | {u_ms:.4} | {rate} | {:.2}x | {:.2}x | {} |",
                        d_ms / f_ms,
                        u_ms / f_ms,
                        goal(f_ms, d_ms, u_ms)
                    );
                }
            }
            for &m in rows.iter().filter(|&&m| m >= bwd_min_rows) {
                let x = dev.upload(&uniform(m * k, 1.0, 5)).unwrap();
                let dy = dev.upload(&uniform(m * n, 1.0, 6)).unwrap();
                let mut dx = dev.zeros::<bf16>(m * k).unwrap();
                let mut ga = dev.zeros::<f32>(r * k).unwrap();
                let mut gb = dev.zeros::<f32>(n * r).unwrap();
                let mut g = dev.zeros::<bf16>(m * r).unwrap();
                let mut u = dev.zeros::<bf16>(m * r).unwrap();
                let mut ga16 = dev.zeros::<bf16>(r * k).unwrap();
                let mut gb16 = dev.zeros::<bf16>(n * r).unwrap();
                // The dx GEMM on the sm_90a kernel where plan::lora_sm90_dx takes it, then on
                // the sm_80 one (the rank products are the same kernels either way).
                let sm90 = qadapt::plan::lora_sm90_dx(
                    m as u64,
                    n as u64,
                    k as u64,
                    r as u64,
                    64,
                    &dev.props(),
                )
                .filter(|_| hopper);
                let f_ms = time_paths(&dev, sm90.is_some(), iters(10), || {
                    let term = LoraBackTerm::adapted(None, (&mut ga, &mut gb));
                    fused.backward(&x, &dy, m, &mut dx, Accumulate::Overwrite, term)
                });
                let d_ms = dev
                    .time_ms(iters(10), || {
                        dev.gemm_bf16(&dy, Op::N, &w, Op::N, &mut dx, (m, k, n), 1.0, 0.0)
                    })
                    .unwrap();
                let u_ms = dev
                    .time_ms(iters(10), || {
                        q.dequantize_into(&dev, &mut wdq)?;
                        dev.gemm_bf16(&dy, Op::N, &wdq, Op::N, &mut dx, (m, k, n), 1.0, 0.0)?;
                        dev.gemm_bf16(&dy, Op::N, &db, Op::N, &mut g, (m, r, n), s, 0.0)?;
                        dev.gemm_bf16(&g, Op::N, &da, Op::N, &mut dx, (m, k, r), 1.0, 1.0)?;
                        dev.gemm_bf16(&x, Op::N, &da, Op::T, &mut u, (m, r, k), s, 0.0)?;
                        dev.gemm_bf16(&g, Op::T, &x, Op::N, &mut ga16, (r, k, m), 1.0, 1.0)?;
                        dev.gemm_bf16(&dy, Op::T, &u, Op::N, &mut gb16, (n, r, m), 1.0, 1.0)
                    })
                    .unwrap();
                for &(on, f_ms) in &f_ms {
                    let kernel = match sm90 {
                        Some(p) if on => {
                            format!("lora_gemm_bwd_dx_nf4_sm90_bn{}_bf16 + rank", p.bn)
                        }
                        _ => "lora_gemm_bwd_*_nf4_bf16".to_owned(),
                    };
                    println!(
                        "| {kernel} | {m} | {n} x {k} | {r} | {f_ms:.4} | {d_ms:.4} | {u_ms:.4} | {:.0} TFLOP/s | {:.2}x | {:.2}x | {} |",
                        2.0 * (m * n * k + 4 * m * r * (n + k)) as f64 / f_ms / 1e9,
                        d_ms / f_ms,
                        u_ms / f_ms,
                        goal(f_ms, d_ms, u_ms)
                    );
                }
            }
        }
    }
}

criterion_group!(benches, cpu_benches);

fn main() {
    cuda_table();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
