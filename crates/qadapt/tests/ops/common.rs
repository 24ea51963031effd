//! What the tests of this binary share: the CUDA device, held under the lock that keeps the
//! virtual device's per-process counters meaningful, and [`test_device!`].
//!
//! The tests run in parallel threads of one process on one device. The virtual device's emulator
//! counters are per process, so a test that counts launches ([`counting`]) must be alone on the
//! device: it holds [`COUNTING`] for writing, and every other GPU test holds it for reading for
//! as long as it uses the device ([`Held`]).

use std::ops::Deref;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::bf16;
use qadapt::Device;
use qadapt::cuda::CudaDevice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

static COUNTING: RwLock<()> = RwLock::new(());

/// A device handle with a shared hold on [`COUNTING`] for as long as it lives.
pub(crate) struct Held<T> {
    value: T,
    _shared: RwLockReadGuard<'static, ()>,
}

impl<T> Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

fn device() -> Device {
    match Device::cuda(0) {
        Ok(d @ Device::Cuda(_)) => d,
        Ok(_) => panic!("Device::cuda returned a non-CUDA device"),
        Err(e) => panic!("this test needs a CUDA device (`just gpu-check`, `just test-vgpu`): {e}"),
    }
}

fn hold<T>(value: T) -> Held<T> {
    Held {
        value,
        _shared: COUNTING.read().unwrap_or_else(PoisonError::into_inner),
    }
}

/// The CUDA device as a [`Device`] (fails loudly without one: these tests never pass silently).
pub(crate) fn cuda() -> Held<Device> {
    hold(device())
}

/// The CUDA device itself.
pub(crate) fn cuda_device() -> Held<CudaDevice> {
    let Device::Cuda(dev) = device() else {
        unreachable!("device() returns a CUDA device")
    };
    hold(dev)
}

/// The device alone, for a test that counts its launches: no other GPU test of this process
/// runs while the guard lives.
pub(crate) fn counting() -> (RwLockWriteGuard<'static, ()>, CudaDevice) {
    let exclusive = COUNTING.write().unwrap_or_else(PoisonError::into_inner);
    let Device::Cuda(dev) = device() else {
        unreachable!("device() returns a CUDA device")
    };
    (exclusive, dev)
}

/// `n` bf16 values uniform in `[-scale, scale)`, and the same values as f32.
pub(crate) fn rand_bf16(seed: u64, n: usize, scale: f32) -> (Vec<bf16>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-scale..scale)))
        .collect();
    let f = b.iter().map(|v| v.to_f32()).collect();
    (b, f)
}

/// One test body on every device: `NAME::cpu` on [`Device::Cpu`] (always run) and `NAME::cuda`
/// on the CUDA device (ignored without one; run by `just test-vgpu` on the virtual device in CI
/// and by the GPU bundle). The body sees the device as `dev: &Device`.
///
/// ```ignore
/// test_device!(fn forward_matches_naive(dev) {
///     let y = layer.forward(dev, &x, m, None).unwrap();
///     assert_close(&y, &want);
/// });
/// ```
macro_rules! test_device {
    ($(#[doc = $doc:literal])* fn $name:ident($dev:ident) $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($dev: &qadapt::Device) $body

            #[test]
            fn cpu() {
                body(&qadapt::Device::Cpu)
            }

            #[test]
            #[ignore = "needs a CUDA device"]
            fn cuda() {
                body(&$crate::common::cuda())
            }
        }
    };
}
pub(crate) use test_device;
