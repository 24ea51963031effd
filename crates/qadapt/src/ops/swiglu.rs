//! The SwiGLU gate of the Llama MLP (the three projections around it are [`super::linear`]):
//!
//! ```text
//! forward   h = silu(g) * u,   silu(g) = g * sigmoid(g)                 (overwritten)
//! backward  dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))       (overwritten)
//!           du = dh * silu(g)                                          (overwritten)
//! ```

use rayon::prelude::*;

use super::{Real, check_len};
use crate::error::Result;

#[inline]
fn sigmoid<T: Real>(g: T) -> T {
    T::ONE / (T::ONE + (-g).exp())
}

/// `h = silu(gate) * up`, elementwise; all three have the same length.
pub fn forward<T: Real>(gate: &[T], up: &[T], h: &mut [T]) -> Result<()> {
    const OP: &str = "swiglu forward";
    check_len(OP, "up", up, gate.len())?;
    check_len(OP, "h", h, gate.len())?;
    h.par_iter_mut()
        .zip(gate.par_iter())
        .zip(up.par_iter())
        .with_min_len(4096)
        .for_each(|((o, &g), &u)| *o = g * sigmoid(g) * u);
    Ok(())
}

/// Backward of [`forward`] (see the module doc).
pub fn backward<T: Real>(
    gate: &[T],
    up: &[T],
    dh: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) -> Result<()> {
    const OP: &str = "swiglu backward";
    for (what, v) in [("up", up), ("dh", dh)] {
        check_len(OP, what, v, gate.len())?;
    }
    check_len(OP, "dgate", dgate, gate.len())?;
    check_len(OP, "dup", dup, gate.len())?;
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(gate.par_iter())
        .zip(up.par_iter())
        .zip(dh.par_iter())
        .with_min_len(4096)
        .for_each(|((((dg, du), &g), &u), &d)| {
            let sg = sigmoid(g);
            *du = d * g * sg;
            *dg = d * u * sg * (T::ONE + g * (T::ONE - sg));
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    #[test]
    fn forward_value() {
        let mut h = [0.0f64; 2];
        forward(&[0.0, 2.0], &[5.0, 3.0], &mut h).unwrap();
        assert_eq!(h[0], 0.0);
        assert!((h[1] - 2.0 / (1.0 + (-2.0f64).exp()) * 3.0).abs() < 1e-15);
        assert!(forward(&[0.0, 2.0], &[5.0], &mut h).is_err());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let g: Vec<f64> = rand_vec(1, 20).iter().map(|x| 4.0 * x).collect();
        let u = rand_vec(2, 20);
        let r = rand_vec(3, 20);
        let (mut dg, mut du) = (vec![0.0; 20], vec![0.0; 20]);
        backward(&g, &u, &r, &mut dg, &mut du).unwrap();
        let loss = |g: &[f64], u: &[f64]| {
            let mut h = vec![0.0; 20];
            forward(g, u, &mut h).unwrap();
            h.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
        };
        check_grad("swiglu dgate", &g, &dg, |x| loss(x, &u)).unwrap();
        check_grad("swiglu dup", &u, &du, |x| loss(&g, x)).unwrap();
    }
}
