//! The optimizer kernels against the CPU reference: the AdamW step bit for bit (f32 master, bf16
//! copy), the sum of squares to f32 rounding of its partials. Needs a CUDA device: ignored by
//! `cargo test`, run by the GPU bundle.

use half::bf16;
use qadapt::optim::{AdamW, adamw_cpu, adamw_cuda, sum_squares_cpu, sum_squares_cuda};

fn vals(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed as f32) * 0.618).sin() * (1.0 + (i % 7) as f32))
        .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_adamw_matches_cpu_bit_for_bit() {
    let dev = crate::common::cuda_device();
    let h = AdamW {
        lr: 3e-3,
        weight_decay: 0.05,
        ..AdamW::default()
    };
    for n in [1usize, 255, 1 << 20 | 3] {
        let mut p = vals(n, 1);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut p16 = vec![bf16::ZERO; n];
        let (mut dp, mut dm, mut dv) = (
            dev.upload(&p).unwrap(),
            dev.upload(&m).unwrap(),
            dev.upload(&v).unwrap(),
        );
        let mut dp16 = dev.upload(&p16).unwrap();
        for t in 1..=4u64 {
            let g = vals(n, 10 + t as u32);
            let s = h.step(t, h.lr * 0.9f32.powi(t as i32), 0.7).unwrap();
            adamw_cpu(&mut p, Some(&mut p16), &g, &mut m, &mut v, &s).unwrap();
            let dg = dev.upload(&g).unwrap();
            adamw_cuda(&dev, &mut dp, Some(&mut dp16), &dg, &mut dm, &mut dv, &s).unwrap();
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&dev.download(&dp).unwrap()), "param, n={n}");
        assert_eq!(bits(&m), bits(&dev.download(&dm).unwrap()), "m, n={n}");
        assert_eq!(bits(&v), bits(&dev.download(&dv).unwrap()), "v, n={n}");
        assert_eq!(p16, dev.download(&dp16).unwrap(), "bf16 copy, n={n}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_sum_squares_matches_cpu() {
    let dev = crate::common::cuda_device();
    let mut all = Vec::new();
    for n in [1usize, 1000, 10_000_019] {
        let x = vals(n, 5);
        let want = sum_squares_cpu(&x);
        let got = sum_squares_cuda(&dev, &dev.upload(&x).unwrap()).unwrap();
        // f32 partials over at most n/(CTAs*256) terms each, then an f64 sum: relative 1e-5.
        assert!((got - want).abs() <= 1e-5 * want, "n={n}: {got} vs {want}");
        all.push((dev.upload(&x).unwrap(), want));
    }
    // Several tensors in one call: each tensor's partials in its own range, one sum.
    let want: f64 = all.iter().map(|(_, w)| w).sum();
    let bufs: Vec<_> = all.iter().map(|(b, _)| b).collect();
    let got = qadapt::optim::sum_squares_cuda_all(&dev, &bufs).unwrap();
    assert!((got - want).abs() <= 1e-5 * want, "all: {got} vs {want}");
    assert_eq!(qadapt::optim::sum_squares_cuda_all(&dev, &[]).unwrap(), 0.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_paged_adamw_matches_device_state_bit_for_bit() {
    use qadapt::optim::{PagedAdamState, adamw_cuda_paged};
    let dev = crate::common::cuda_device();
    let h = AdamW::default();
    let n = 3 << 20;
    let p0 = vals(n, 2);
    let (mut dp, mut pp) = (dev.upload(&p0).unwrap(), dev.upload(&p0).unwrap());
    let (mut dm, mut dv) = (dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
    let mut paged = PagedAdamState::new(&dev, n).unwrap();
    assert_eq!(paged.len(), n);
    for t in 1..=3u64 {
        let g = dev.upload(&vals(n, 20 + t as u32)).unwrap();
        let s = h.step(t, h.lr, 1.0).unwrap();
        adamw_cuda(&dev, &mut dp, None, &g, &mut dm, &mut dv, &s).unwrap();
        adamw_cuda_paged(&dev, &mut pp, None, &g, &mut paged, &s).unwrap();
    }
    assert_eq!(dev.download(&dp).unwrap(), dev.download(&pp).unwrap());
    let (m, v) = paged.to_host(&dev).unwrap();
    assert_eq!(m, dev.download(&dm).unwrap());
    assert_eq!(v, dev.download(&dv).unwrap());
    // A resumed state: the moments written back from the host, then one more step on each.
    let mut resumed = PagedAdamState::from_host(&dev, &m, &v).unwrap();
    assert_eq!(resumed.to_host(&dev).unwrap(), (m.clone(), v.clone()));
    let g = dev.upload(&vals(n, 24)).unwrap();
    let s = h.step(4, h.lr, 1.0).unwrap();
    adamw_cuda(&dev, &mut dp, None, &g, &mut dm, &mut dv, &s).unwrap();
    adamw_cuda_paged(&dev, &mut pp, None, &g, &mut resumed, &s).unwrap();
    assert_eq!(dev.download(&dp).unwrap(), dev.download(&pp).unwrap());
    assert!(PagedAdamState::from_host(&dev, &m, &v[1..]).is_err());
}
