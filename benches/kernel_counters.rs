//! The virtual device's counters per kernel and shape (goals: BENCHMARKS.md): what the emulator
//! counts while it runs our kernels, decided by the code and not by timing, so it is the
//! performance instrument where no GPU is at hand. Run with `just kernel-counters` (on the virtual
//! device); on a real GPU or without a device it says why it prints nothing.
//!
//! Per kernel: launches, CTAs, `mma.sync` and `ldmatrix` instructions (per warp), the
//! shared-memory wavefronts of those `ldmatrix` (1 per 8x8 matrix when conflict-free, up to 8),
//! the `cp.async` bytes and the CTA barriers; and the memory traffic of every load and store of
//! kernel code (the emulator's memory checker): global bytes loaded and stored, 32-byte sectors
//! per warp-level request and the share of the loaded sectors' bytes the lanes asked for (100%
//! when coalesced; above 100% when lanes share bytes), and shared-memory wavefronts against the
//! conflict-free count (1.00 without bank conflicts; `ldmatrix` included), and all those shared
//! wavefronts per `mma` (`ldmatrix`, `cp.async` writes, the NF4 decode's lookups and stores, the
//! epilogue). The derived columns are the ones the
//! kernel-speed work is judged by: shared wavefronts per `mma` (the NF4 GEMM's within 1.25x of
//! the dense GEMM's), coalescing, bank conflicts, and CTAs against the 132 SMs of the
//! H200.
//!
//! On the virtual H200 (sm_90) the NF4 forward and backward at a GEMM shape the sm_90a kernels
//! take (`kernels/lora_sm90.cu`) run twice: on the sm_80 kernels (`forward nf4`), then the sm_90a
//! ones (`forward nf4, sm_90a`, `backward nf4, sm_90a`); there one `mma` is an m16n8k16 product and a wgmma m64nNk16 counts as
//! N / 2 of them, and its operands come through TMA (global loads) and descriptors (not counted as
//! `ldmatrix`).
//!
//! Options (`--name value`): `--n`, `--k` (4096 x 4096: a Llama-3-8B attention projection),
//! `--m` (512 rows for the GEMM paths; the gemv paths run 1 and 16, and 128 rows the GEMM path
//! with k split across the SMs), `--rank` (16). Shapes are
//! `m x n x k`: `y [m, n] = x [m, k] W^T [k, n]`.
//!
//! Attention, the scalar kernels (`attention.cu`) and the tensor-core ones (`flash_attention.cu`)
//! forward and backward at `--seq` (1024) tokens of 8 query heads over 2 kv heads of 128 (the
//! head layout of Llama-3-8B with a quarter of its heads); `--attention` runs only these.

use half::bf16;
use qadapt::Device;
use qadapt::FloatVec;
use qadapt::cuda::CudaDevice;
use qadapt::lora::{AdapterStack, BaseWeight, CudaLoraLinear, LoraBackTerm, LoraLinear, LoraTerm};
use qadapt::nf4::{CudaNf4, Nf4Tensor, Statistics};
use qadapt::ops::Accumulate;
use qadapt_suite::randn;

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == &format!("--{name}"))
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--{name}: not a number: {v:?}"))
        })
}

/// One table row per kernel launched since the last reset.
fn report(dev: &CudaDevice, path: &str, shape: &str) {
    for kernel in qadapt_kernels::KERNELS {
        let Some((launches, c)) = dev.emulator_counters(*kernel) else {
            continue;
        };
        if launches == 0 {
            continue;
        }
        let per = |a: u64, b: u64| {
            if b == 0 {
                "-".to_owned()
            } else {
                format!("{:.2}", a as f64 / b as f64)
            }
        };
        let mib = |b: u64| format!("{:.2}", b as f64 / (1024.0 * 1024.0));
        let used = |bytes: u64, sectors: u64| {
            if sectors == 0 {
                "-".to_owned()
            } else {
                format!("{:.0}%", 100.0 * bytes as f64 / (32.0 * sectors as f64))
            }
        };
        println!(
            "| {path} | {shape} | {} | {launches} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            kernel.name,
            c.ctas,
            c.mma,
            c.ldmatrix,
            per(c.ldmatrix_wavefronts, c.ldmatrix),
            per(c.ldmatrix_wavefronts, c.mma),
            c.cp_async_bytes as f64 / 1024.0,
            per(c.bar_sync, c.ctas),
            mib(c.global_ld_bytes),
            per(c.global_ld_sectors, c.global_ld_requests),
            used(c.global_ld_bytes, c.global_ld_sectors),
            mib(c.global_st_bytes),
            per(c.global_st_sectors, c.global_st_requests),
            per(c.shared_wavefronts, c.shared_ideal_wavefronts),
            per(c.shared_wavefronts, c.mma),
        );
    }
    dev.reset_emulator_counters();
}

fn main() {
    let dev = match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        Ok(_) => unreachable!(),
        Err(e) => {
            println!("kernel counters skipped: {e}");
            return;
        }
    };
    if !dev.reset_emulator_counters() {
        println!(
            "kernel counters skipped: {} is not the virtual device (run `just kernel-counters`)",
            dev.describe()
        );
        return;
    }
    let attention_only = std::env::args().any(|a| a == "--attention");
    let (n, k, m, r) = (
        arg("n", 4096),
        arg("k", 4096),
        arg("m", 512),
        arg("rank", 16),
    );
    println!(
        "\nKernel counters on {} (emulated; no times)",
        dev.describe()
    );
    println!(
        "| path | shape | kernel | launches | CTAs | mma | ldmatrix | wavefronts / ldmatrix | wavefronts / mma | cp.async KiB | barriers / CTA | global ld MiB | sectors / ld request | ld bytes used | global st MiB | sectors / st request | shared wavefronts / ideal | shared wavefronts / mma |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    attention(&dev, arg("seq", 1024));
    if attention_only {
        return;
    }
    let w = randn(n * k, 0.02, 1);
    let adapters = AdapterStack::new(
        r,
        bf(&randn(r * k, 0.02, 2)),
        bf(&randn(n * r, 0.02, 3)),
        vec![2.0],
    )
    .unwrap();
    let q = Nf4Tensor::quantize(
        &Device::Cpu,
        &FloatVec::F32(w.clone()),
        &[n, k],
        64,
        Statistics::DoubleQuant,
    )
    .unwrap();
    for (base, weight) in [
        ("dense", BaseWeight::Dense(bf(&w))),
        ("nf4", BaseWeight::Nf4(q.clone())),
    ] {
        let layer = LoraLinear::new(n, k, weight, None, adapters.clone()).unwrap();
        let fused = CudaLoraLinear::upload(&dev, &layer).unwrap();
        dev.reset_emulator_counters();
        for rows in [1, 16, 128, m] {
            let x = dev.upload(&bf(&randn(rows * k, 1.0, 4))).unwrap();
            let mut y = dev.zeros::<bf16>(rows * n).unwrap();
            // The virtual H200 is sm_90: an NF4 GEMM the sm_90a kernel takes (plan::lora_sm90)
            // is counted twice, on the sm_80 kernel and on the sm_90a one.
            let sm90 = base == "nf4"
                && qadapt::plan::lora_sm90(
                    rows as u64,
                    n as u64,
                    k as u64,
                    r as u64,
                    64,
                    &dev.props(),
                )
                .is_some();
            for hopper in [false, true].into_iter().filter(|&h| !h || sm90) {
                dev.set_hopper_kernels(hopper).unwrap();
                fused
                    .forward(
                        &x,
                        rows,
                        &mut y,
                        Accumulate::Overwrite,
                        LoraTerm::adapted(None),
                    )
                    .unwrap();
                let path = if hopper {
                    "forward nf4, sm_90a"
                } else {
                    &format!("forward {base}")
                };
                report(&dev, path, &format!("{rows} x {n} x {k}"));
            }
        }
        let x = dev.upload(&bf(&randn(m * k, 1.0, 5))).unwrap();
        let dy = dev.upload(&bf(&randn(m * n, 1.0, 6))).unwrap();
        let mut dx = dev.zeros::<bf16>(m * k).unwrap();
        let mut ga = dev.zeros::<f32>(r * k).unwrap();
        let mut gb = dev.zeros::<f32>(n * r).unwrap();
        let sm90 = base == "nf4"
            && qadapt::plan::lora_sm90_dx(m as u64, n as u64, k as u64, r as u64, 64, &dev.props())
                .is_some();
        for hopper in [false, true].into_iter().filter(|&h| !h || sm90) {
            dev.set_hopper_kernels(hopper).unwrap();
            fused
                .backward(
                    &x,
                    &dy,
                    m,
                    &mut dx,
                    Accumulate::Overwrite,
                    LoraBackTerm::adapted(None, (&mut ga, &mut gb)),
                )
                .unwrap();
            let path = if hopper {
                "backward nf4, sm_90a"
            } else {
                &format!("backward {base}")
            };
            report(&dev, path, &format!("{m} x {n} x {k}"));
        }
    }
    let dq = CudaNf4::upload(&dev, &q).unwrap();
    let mut out = dev.zeros::<bf16>(n * k).unwrap();
    dq.dequantize_into(&dev, &mut out).unwrap();
    report(&dev, "dequantize bf16", &format!("{n} x {k}"));
}

/// The scalar and the tensor-core attention, forward then backward, on one sequence.
fn attention(dev: &CudaDevice, seq: usize) {
    use qadapt::cuda::ops::{self, AttentionKernels::*};
    use qadapt::ops::attention::AttentionShape;
    let sh = AttentionShape {
        batch: 1,
        seq,
        heads: 8,
        kv_heads: 2,
        head_dim: 128,
    };
    let (qn, kn) = (
        seq * sh.heads * sh.head_dim,
        seq * sh.kv_heads * sh.head_dim,
    );
    let q = dev.upload(&bf(&randn(qn, 1.0, 7))).unwrap();
    let k = dev.upload(&bf(&randn(kn, 1.0, 8))).unwrap();
    let v = dev.upload(&bf(&randn(kn, 1.0, 9))).unwrap();
    let dout = dev.upload(&bf(&randn(qn, 1.0, 10))).unwrap();
    let mut lse = dev.zeros::<f32>(seq * sh.heads).unwrap();
    let mut out = dev.zeros::<bf16>(qn).unwrap();
    let mut dq = dev.zeros::<bf16>(qn).unwrap();
    let mut dk = dev.zeros::<bf16>(kn).unwrap();
    let mut dv = dev.zeros::<bf16>(kn).unwrap();
    let shape = format!("{seq} x 8/2 heads x 128");
    dev.reset_emulator_counters();
    ops::attention_forward(dev, Scalar, sh, &q, &k, &v, None, &mut lse, &mut out).unwrap();
    report(dev, "attention forward, scalar", &shape);
    ops::attention_backward(
        dev, Scalar, sh, &q, &k, &v, None, None, &lse, &dout, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    report(dev, "attention backward, scalar", &shape);
    ops::attention_forward(dev, Flash, sh, &q, &k, &v, None, &mut lse, &mut out).unwrap();
    report(dev, "attention forward, flash", &shape);
    ops::attention_backward(
        dev,
        Flash,
        sh,
        &q,
        &k,
        &v,
        None,
        Some(&out),
        &lse,
        &dout,
        &mut dq,
        &mut dk,
        &mut dv,
    )
    .unwrap();
    report(dev, "attention backward, flash (delta from out)", &shape);
    ops::attention_backward(
        dev, Flash, sh, &q, &k, &v, None, None, &lse, &dout, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    report(dev, "attention backward, flash (delta recomputed)", &shape);
}
