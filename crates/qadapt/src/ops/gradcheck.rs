//! Finite-difference gradient checks in f64: the ops' tests use them, and so do the training
//! crate's model-level checks and any downstream op's.
//!
//! Each check compares an analytic gradient `g` of a scalar `L(p)` with the central difference
//! `(L(p + h e_i) - L(p - h e_i)) / 2h` for every element, with `h = 1e-5`. The truncation error is
//! `O(h^2) ~ 1e-10` and the rounding error `~ 1e-16 |L| / h ~ 1e-11`, so a correct gradient agrees to
//! about 1e-8; we accept `|g - fd| <= 1e-6 * (1 + |fd|)`, far below what any real bug gives (a
//! missing term or a wrong sign is O(|g|)). `wrong_gradient_is_caught` shows that the check fails.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-1, 1) from the ChaCha8 stream of `seed`.
pub fn rand_vec(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Compares `grad` with central differences of `loss` around `p`; the error names the first bad
/// element.
pub fn check_grad(
    what: &str,
    p: &[f64],
    grad: &[f64],
    mut loss: impl FnMut(&[f64]) -> f64,
) -> Result<(), String> {
    let mut q = p.to_vec();
    check_grad_with(what, p, grad, |i, v| {
        q[i] = v;
        loss(&q)
    })
}

/// [`check_grad`] for parameters that live elsewhere (a model's tensors, an adapter's): `p` are
/// their values, and `loss_at(i, v)` sets parameter `i` to `v` and returns the loss. Each element
/// is set back to `p[i]` (one more call) before the next is probed.
pub fn check_grad_with(
    what: &str,
    p: &[f64],
    grad: &[f64],
    mut loss_at: impl FnMut(usize, f64) -> f64,
) -> Result<(), String> {
    const H: f64 = 1e-5;
    assert_eq!(p.len(), grad.len(), "{what}: gradient length");
    for i in 0..p.len() {
        let up = loss_at(i, p[i] + H);
        let down = loss_at(i, p[i] - H);
        loss_at(i, p[i]);
        let fd = (up - down) / (2.0 * H);
        if (grad[i] - fd).abs() > 1e-6 * (1.0 + fd.abs()) {
            return Err(format!(
                "{what}[{i}]: analytic {} vs finite difference {fd}",
                grad[i]
            ));
        }
    }
    Ok(())
}

#[test]
fn wrong_gradient_is_caught() {
    let p = rand_vec(7, 4);
    let loss = |v: &[f64]| v.iter().map(|x| x * x * x).sum::<f64>();
    let good: Vec<f64> = p.iter().map(|x| 3.0 * x * x).collect();
    check_grad("cube", &p, &good, loss).unwrap();
    let mut bad = good.clone();
    bad[2] *= 1.001;
    let err = check_grad("cube", &p, &bad, loss).unwrap_err();
    assert!(err.starts_with("cube[2]"), "{err}");
}
