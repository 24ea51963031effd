//! NF4 quantize/dequantize throughput.
//!
//! CPU (criterion): GB/s of input read for quantize, of output written for dequantize, on a
//! 4096 x 4096 weight. CUDA (when a device is present): dequantize of real model shapes against
//! the device-to-device copy bandwidth measured in the same run, printed as a table
//! (`kernel | shape | time | GB/s | copy GB/s | ratio`). Bytes moved by dequantize to bf16:
//! n/2 codes + absmax read, 2n written; the copy baseline moves the same total (read + write).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use half::bf16;
use qadapt::nf4::{CudaNf4, Nf4Tensor, Statistics};
use qadapt::{DType, Device, FloatVec};
use qadapt_suite::{bench_smoke, randn};

fn cpu(c: &mut Criterion) {
    let (rows, cols) = (4096usize, 4096usize);
    let n = rows * cols;
    let w = randn(n, 0.02, 1);
    let w_bf16 = FloatVec::BF16(w.iter().map(|x| bf16::from_f32(*x)).collect());
    let w_f32 = FloatVec::F32(w);
    let mut g = c.benchmark_group("nf4_cpu");
    g.sample_size(10);
    for (name, x) in [("f32", &w_f32), ("bf16", &w_bf16)] {
        g.throughput(Throughput::Bytes((n * x.dtype().size()) as u64));
        g.bench_with_input(BenchmarkId::new("quantize", name), x, |b, x| {
            b.iter(|| {
                Nf4Tensor::quantize(
                    &Device::Cpu,
                    black_box(x),
                    &[rows, cols],
                    64,
                    Statistics::Plain,
                )
                .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("quantize_dq", name), x, |b, x| {
            b.iter(|| {
                Nf4Tensor::quantize(
                    &Device::Cpu,
                    black_box(x),
                    &[rows, cols],
                    64,
                    Statistics::DoubleQuant,
                )
                .unwrap()
            })
        });
    }
    let q = Nf4Tensor::quantize(
        &Device::Cpu,
        &w_bf16,
        &[rows, cols],
        64,
        Statistics::DoubleQuant,
    )
    .unwrap();
    for d in [DType::BF16, DType::F32] {
        g.throughput(Throughput::Bytes((n * d.size()) as u64));
        g.bench_with_input(
            BenchmarkId::new("dequantize_dq", d.to_string()),
            &d,
            |b, d| b.iter(|| q.dequantize(&Device::Cpu, *d).unwrap()),
        );
    }
    g.finish();
}

/// The CUDA table; prints why it is skipped without a device.
fn cuda() {
    let dev = match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        Ok(_) => unreachable!(),
        Err(e) => {
            println!("nf4 CUDA benches skipped: {e}");
            return;
        }
    };
    // Smoke: one awkward shape (a partial block of 64, a partial double-quant block of 256), one
    // timed call each; the numbers mean nothing.
    let smoke = bench_smoke();
    let iters = |n: usize| if smoke { 1 } else { n };
    if smoke {
        println!("\nSMOKE RUN (QADAPT_BENCH_SMOKE=1): tiny shapes, times mean nothing");
    }
    println!("\nNF4 dequantize on {}", dev.describe());
    println!("| kernel | shape | stats | time (us) | GB/s | copy GB/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    let shapes: &[(usize, usize)] = if smoke {
        &[(67, 400)]
    } else {
        &[(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
    };
    for &(rows, cols) in shapes {
        let n = rows * cols;
        let w: Vec<bf16> = randn(n, 0.02, 2)
            .iter()
            .map(|x| bf16::from_f32(*x))
            .collect();
        let x = dev.upload(&w).unwrap();
        for stats in [Statistics::Plain, Statistics::DoubleQuant] {
            let q = CudaNf4::quantize(&dev, &x, 64, stats).unwrap();
            let mut out = dev.zeros::<bf16>(n).unwrap();
            let scale_bytes = match stats {
                Statistics::Plain => 4 * n / 64,
                Statistics::DoubleQuant => n / 64 + 4 * n / 64 / 256,
            };
            let bytes = (n / 2 + scale_bytes + 2 * n) as f64;
            let ms = dev
                .time_ms(iters(50), || q.dequantize_into(&dev, &mut out))
                .unwrap();
            let src = dev.zeros::<u8>(bytes as usize / 2).unwrap();
            let mut dst = dev.zeros::<u8>(bytes as usize / 2).unwrap();
            let copy_ms = dev.time_ms(iters(50), || dev.copy(&src, &mut dst)).unwrap();
            let gbs = bytes / ms / 1e6;
            let copy_gbs = bytes / copy_ms / 1e6;
            println!(
                "| nf4_dequantize_bf16 | {rows}x{cols} | {stats:?} | {:.1} | {gbs:.0} | {copy_gbs:.0} | {:.2} |",
                ms * 1e3,
                gbs / copy_gbs
            );
        }
        let q = CudaNf4::quantize(&dev, &x, 64, Statistics::DoubleQuant).unwrap();
        drop(q);
        let ms = dev
            .time_ms(iters(5), || {
                CudaNf4::quantize(&dev, &x, 64, Statistics::DoubleQuant).map(drop)
            })
            .unwrap();
        println!(
            "| nf4_quantize_bf16+dq | {rows}x{cols} | DoubleQuant | {:.1} | {:.0} | - | - |",
            ms * 1e3,
            (2 * n + n / 2) as f64 / ms / 1e6
        );
    }
}

criterion_group!(benches, cpu);

fn main() {
    cuda();
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
