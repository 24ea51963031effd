//! NF4 kernels against the CPU reference, bit for bit, on awkward sizes (odd element counts,
//! partial blocks, zero blocks, every block size and input type, double quant across several
//! nested blocks). These need a CUDA device: they are ignored by `cargo test` and run by the GPU
//! bundle (`just gpu-check`). Without a device they fail; they never pass silently.

use half::{bf16, f16};
use qadapt::nf4::{CudaNf4, Nf4Tensor, Scales, Statistics};
use qadapt::{DType, Device, FloatVec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda, cuda_device};

/// Deterministic values with structure: a zero block, an outlier, exact midpoints, negatives.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(u64::from(seed));
    (0..n)
        .map(|i| {
            let u: f32 = rng.random_range(-0.5..0.5);
            match i % 997 {
                0..=63 if i < 64 => 0.0,
                500 => 1e4,
                501 => -0.039_790_15,
                _ => 3.0 * u,
            }
        })
        .collect()
}

fn as_dtype(v: &[f32], d: DType) -> FloatVec {
    match d {
        DType::F32 => FloatVec::F32(v.to_vec()),
        DType::BF16 => FloatVec::BF16(v.iter().map(|x| bf16::from_f32(*x)).collect()),
        DType::F16 => FloatVec::F16(v.iter().map(|x| f16::from_f32(*x)).collect()),
    }
}

const SIZES: [usize; 7] = [1, 31, 999, 4097, 65_537, 300 * 64 + 3, 1 << 20];
const BLOCKS: [usize; 6] = [32, 64, 128, 256, 1024, 4096];
const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_quantize_matches_cpu_bit_for_bit() {
    let gpu = cuda();
    for (k, &n) in SIZES.iter().enumerate() {
        for &bs in &BLOCKS {
            for &d in &DTYPES {
                let x = as_dtype(&values(n, k as u32 + bs as u32), d);
                for stats in [Statistics::Plain, Statistics::DoubleQuant] {
                    let cpu = Nf4Tensor::quantize(&Device::Cpu, &x, &[n], bs, stats).unwrap();
                    let dev = Nf4Tensor::quantize(&gpu, &x, &[n], bs, stats).unwrap();
                    let what = format!("n={n} bs={bs} {d} {stats:?}");
                    assert_eq!(cpu.packed, dev.packed, "packed, {what}");
                    match (&cpu.scales, &dev.scales) {
                        (Scales::Absmax(a), Scales::Absmax(b)) => {
                            assert_eq!(bits(a), bits(b), "absmax, {what}")
                        }
                        (Scales::Double(a), Scales::Double(b)) => {
                            assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "offset, {what}");
                            assert_eq!(a.codes, b.codes, "codes, {what}");
                            assert_eq!(
                                bits(&a.nested_absmax),
                                bits(&b.nested_absmax),
                                "nested, {what}"
                            );
                        }
                        _ => panic!("statistics differ, {what}"),
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_dequantize_matches_cpu_bit_for_bit() {
    let gpu = cuda();
    for (k, &n) in SIZES.iter().enumerate() {
        for &bs in &BLOCKS {
            let x = FloatVec::F32(values(n, 7 + k as u32));
            for stats in [Statistics::Plain, Statistics::DoubleQuant] {
                let q = Nf4Tensor::quantize(&Device::Cpu, &x, &[n], bs, stats).unwrap();
                for &d in &DTYPES {
                    let cpu = q.dequantize(&Device::Cpu, d).unwrap();
                    let dev = q.dequantize(&gpu, d).unwrap();
                    assert_eq!(
                        cpu.as_bytes(),
                        dev.as_bytes(),
                        "n={n} bs={bs} {d} {stats:?}"
                    );
                }
            }
        }
    }
}

/// The small case `compute-sanitizer --tool memcheck` runs in the GPU bundle: every kernel once,
/// on sizes whose tails exercise the bounds checks.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_small_roundtrip_for_sanitizer() {
    let dev = cuda_device();
    for n in [1usize, 33, 1001] {
        let x: Vec<f32> = values(n, 3);
        let input = dev.upload(&x).unwrap();
        for stats in [Statistics::Plain, Statistics::DoubleQuant] {
            let q = CudaNf4::quantize(&dev, &input, 32, stats).unwrap();
            let back = dev.download(&q.dequantize::<f32>(&dev).unwrap()).unwrap();
            let cpu = Nf4Tensor::quantize(&Device::Cpu, &FloatVec::F32(x.clone()), &[n], 32, stats)
                .unwrap()
                .dequantize(&Device::Cpu, DType::F32)
                .unwrap();
            assert_eq!(FloatVec::F32(back), cpu, "n={n} {stats:?}");
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs everywhere: asking for CUDA here gives a typed error, never a panic.
#[test]
fn cuda_request_without_device_is_a_typed_error() {
    match Device::cuda(0) {
        Ok(_) => {} // a GPU machine
        Err(qadapt::Error::CudaNotCompiled | qadapt::Error::NoDevice(_)) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    assert!(Device::parse("tpu").is_err());
}
