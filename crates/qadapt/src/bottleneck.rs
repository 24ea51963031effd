//! Houlsby bottleneck adapters: a small residual MLP inserted after a
//! sublayer, CPU reference forward and backward, generic over [`Real`] like [`crate::ops`].
//!
//! ```text
//! z = x Wd^T + bd          x [rows, h], Wd [b, h], bd [b]     (down projection, saved)
//! a = act(z)                                                  (nonlinearity)
//! y = x + a Wu^T + bu      Wu [h, b], bu [h]                  (up projection + residual)
//! ```
//! Backward, with dy the gradient of y:
//! ```text
//! dbu += sum_rows dy          dWu += dy^T a
//! da   = dy Wu                dz   = da * act'(z)
//! dbd += sum_rows dz          dWd += dz^T x
//! dx (=|+=) dy + dz Wd
//! ```
//! Parameter gradients are accumulated; dx is overwritten or accumulated as asked. With Wu = 0
//! and bu = 0 (the near-identity initialisation of [`BottleneckParams::init`]) the adapter is the
//! identity, so inserting it leaves a pretrained model's outputs unchanged before training.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::ops::linear::{self, LinearShape};
use crate::ops::{Accumulate, Real, check_len};

/// The nonlinearity between the two projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// max(0, z).
    Relu,
    /// z * sigmoid(z) (swish).
    #[default]
    Silu,
    /// GELU, tanh approximation (`gelu_new` in transformers).
    GeluTanh,
}

impl Activation {
    /// act(z) and act'(z).
    #[inline]
    pub fn eval<T: Real>(self, z: T) -> (T, T) {
        let half = T::from_f64(0.5);
        match self {
            Activation::Relu => {
                if z > T::ZERO {
                    (z, T::ONE)
                } else {
                    (T::ZERO, T::ZERO)
                }
            }
            Activation::Silu => {
                let s = T::ONE / (T::ONE + (-z).exp());
                (z * s, s * (T::ONE + z * (T::ONE - s)))
            }
            Activation::GeluTanh => {
                let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
                let k = T::from_f64(0.044715);
                let u = c * (z + k * z * z * z);
                let t = T::ONE - T::from_f64(2.0) / ((u + u).exp() + T::ONE);
                let du = c * (T::ONE + T::from_f64(3.0) * k * z * z);
                (
                    half * z * (T::ONE + t),
                    half * (T::ONE + t) + half * z * (T::ONE - t * t) * du,
                )
            }
        }
    }

    /// The name used in adapter configs.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_new",
        }
    }

    /// Parses [`Activation::name`] (and `swish`, `gelu_pytorch_tanh`).
    pub fn parse(s: &str) -> Option<Activation> {
        match s {
            "relu" => Some(Activation::Relu),
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            _ => None,
        }
    }
}

/// Sizes of an adapter applied to `rows` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BottleneckShape {
    /// Tokens.
    pub rows: usize,
    /// Model width.
    pub hidden: usize,
    /// Bottleneck width.
    pub bottleneck: usize,
}

impl BottleneckShape {
    /// Trainable parameters: `2 * hidden * bottleneck + bottleneck + hidden`.
    pub fn num_params(&self) -> usize {
        2 * self.hidden * self.bottleneck + self.bottleneck + self.hidden
    }

    fn down(&self) -> LinearShape {
        LinearShape {
            rows: self.rows,
            inp: self.hidden,
            out: self.bottleneck,
        }
    }

    fn up(&self) -> LinearShape {
        LinearShape {
            rows: self.rows,
            inp: self.bottleneck,
            out: self.hidden,
        }
    }
}

/// The adapter's parameters (or their gradients: same shapes).
#[derive(Debug, Clone, PartialEq)]
pub struct BottleneckParams<T> {
    /// Wd `[bottleneck, hidden]`.
    pub down: Vec<T>,
    /// bd `[bottleneck]`.
    pub down_bias: Vec<T>,
    /// Wu `[hidden, bottleneck]`.
    pub up: Vec<T>,
    /// bu `[hidden]`.
    pub up_bias: Vec<T>,
}

impl<T: Real> BottleneckParams<T> {
    /// All zeros (a gradient accumulator).
    pub fn zeros(hidden: usize, bottleneck: usize) -> Self {
        BottleneckParams {
            down: vec![T::ZERO; hidden * bottleneck],
            down_bias: vec![T::ZERO; bottleneck],
            up: vec![T::ZERO; hidden * bottleneck],
            up_bias: vec![T::ZERO; hidden],
        }
    }

    /// Near-identity initialisation: Wd uniform in ±`scale` from `seed`, everything else zero,
    /// so the adapter starts as the identity and Wd still receives gradient through Wu.
    pub fn init(hidden: usize, bottleneck: usize, scale: f64, seed: u64) -> Self {
        let mut p = Self::zeros(hidden, bottleneck);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for w in &mut p.down {
            *w = T::from_f64(scale * rng.random_range(-1.0..1.0));
        }
        p
    }

    fn check(&self, op: &'static str, s: &BottleneckShape) -> Result<()> {
        check_len(op, "down", &self.down, s.bottleneck * s.hidden)?;
        check_len(op, "down_bias", &self.down_bias, s.bottleneck)?;
        check_len(op, "up", &self.up, s.hidden * s.bottleneck)?;
        check_len(op, "up_bias", &self.up_bias, s.hidden)
    }
}

/// Forward: overwrites `z` (`[rows, bottleneck]`, saved for the backward) and `y` (`[rows, hidden]`).
pub fn forward<T: Real>(
    s: BottleneckShape,
    act: Activation,
    x: &[T],
    p: &BottleneckParams<T>,
    z: &mut [T],
    y: &mut [T],
) -> Result<()> {
    const OP: &str = "bottleneck adapter forward";
    p.check(OP, &s)?;
    check_len(OP, "x", x, s.rows * s.hidden)?;
    check_len(OP, "z", z, s.rows * s.bottleneck)?;
    check_len(OP, "y", y, s.rows * s.hidden)?;
    linear::forward(s.down(), x, &p.down, z, Accumulate::Overwrite)?;
    for row in z.chunks_exact_mut(s.bottleneck) {
        for (v, b) in row.iter_mut().zip(&p.down_bias) {
            *v += *b;
        }
    }
    let a: Vec<T> = z.iter().map(|&v| act.eval(v).0).collect();
    for (yr, xr) in y.chunks_exact_mut(s.hidden).zip(x.chunks_exact(s.hidden)) {
        for ((yv, xv), b) in yr.iter_mut().zip(xr).zip(&p.up_bias) {
            *yv = *xv + *b;
        }
    }
    linear::forward(s.up(), &a, &p.up, y, Accumulate::Add)
}

/// Backward of [`forward`]: accumulates into `grads`, writes or adds `dx` as `dx_acc` says.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    s: BottleneckShape,
    act: Activation,
    x: &[T],
    z: &[T],
    p: &BottleneckParams<T>,
    dy: &[T],
    dx: &mut [T],
    dx_acc: Accumulate,
    grads: &mut BottleneckParams<T>,
) -> Result<()> {
    const OP: &str = "bottleneck adapter backward";
    p.check(OP, &s)?;
    grads.check(OP, &s)?;
    check_len(OP, "x", x, s.rows * s.hidden)?;
    check_len(OP, "z", z, s.rows * s.bottleneck)?;
    check_len(OP, "dy", dy, s.rows * s.hidden)?;
    check_len(OP, "dx", dx, s.rows * s.hidden)?;
    let (a, da_dz): (Vec<T>, Vec<T>) = z.iter().map(|&v| act.eval(v)).unzip();
    for row in dy.chunks_exact(s.hidden) {
        for (g, d) in grads.up_bias.iter_mut().zip(row) {
            *g += *d;
        }
    }
    let mut dz = vec![T::ZERO; s.rows * s.bottleneck];
    linear::backward(
        s.up(),
        &a,
        &p.up,
        dy,
        Some((&mut dz, Accumulate::Overwrite)),
        Some(&mut grads.up),
    )?;
    for (d, g) in dz.iter_mut().zip(&da_dz) {
        *d *= *g;
    }
    for row in dz.chunks_exact(s.bottleneck) {
        for (g, d) in grads.down_bias.iter_mut().zip(row) {
            *g += *d;
        }
    }
    for (o, d) in dx.iter_mut().zip(dy) {
        dx_acc.store(o, *d);
    }
    linear::backward(
        s.down(),
        x,
        &p.down,
        &dz,
        Some((dx, Accumulate::Add)),
        Some(&mut grads.down),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    const S: BottleneckShape = BottleneckShape {
        rows: 5,
        hidden: 7,
        bottleneck: 3,
    };

    fn params(seed: u64) -> BottleneckParams<f64> {
        BottleneckParams {
            down: rand_vec(seed, 21),
            down_bias: rand_vec(seed + 1, 3),
            up: rand_vec(seed + 2, 21),
            up_bias: rand_vec(seed + 3, 7),
        }
    }

    #[test]
    fn identity_at_init_and_parameter_count() {
        let p = BottleneckParams::<f32>::init(7, 3, 0.01, 9);
        assert!(p.down.iter().any(|&w| w != 0.0) && p.down.iter().all(|w| w.abs() <= 0.01));
        let x: Vec<f32> = (0..35).map(|i| i as f32 * 0.1 - 1.0).collect();
        let (mut z, mut y) = (vec![0f32; 15], vec![0f32; 35]);
        forward(S, Activation::GeluTanh, &x, &p, &mut z, &mut y).unwrap();
        assert_eq!(y, x);
        assert_eq!(S.num_params(), 2 * 7 * 3 + 3 + 7);
    }

    #[test]
    fn activations_match_their_definitions() {
        for z in [-2.0f64, -0.3, 0.0, 0.7, 3.0] {
            let (r, _) = Activation::Relu.eval(z);
            assert_eq!(r, z.max(0.0));
            let (s, _) = Activation::Silu.eval(z);
            assert!((s - z / (1.0 + (-z).exp())).abs() < 1e-15);
            let (g, _) = Activation::GeluTanh.eval(z);
            let want = 0.5
                * z
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z.powi(3))).tanh());
            assert!((g - want).abs() < 1e-15, "{z}");
            for act in [Activation::Silu, Activation::GeluTanh] {
                let h = 1e-6;
                let fd = (act.eval(z + h).0 - act.eval(z - h).0) / (2.0 * h);
                assert!((act.eval(z).1 - fd).abs() < 1e-8, "{act:?} at {z}");
            }
            assert_eq!(
                Activation::parse(Activation::GeluTanh.name()),
                Some(Activation::GeluTanh)
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for act in [Activation::Relu, Activation::Silu, Activation::GeluTanh] {
            let x = rand_vec(1, 35);
            let p = params(10);
            let r = rand_vec(2, 35);
            let loss = |x: &[f64], p: &BottleneckParams<f64>| {
                let (mut z, mut y) = (vec![0.0; 15], vec![0.0; 35]);
                forward(S, act, x, p, &mut z, &mut y).unwrap();
                y.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
            };
            let mut z = vec![0.0; 15];
            forward(S, act, &x, &p, &mut z, &mut vec![0.0; 35]).unwrap();
            let mut g = BottleneckParams::zeros(7, 3);
            let mut dx = vec![5.0; 35];
            backward(
                S,
                act,
                &x,
                &z,
                &p,
                &r,
                &mut dx,
                Accumulate::Overwrite,
                &mut g,
            )
            .unwrap();
            check_grad("dx", &x, &dx, |v| loss(v, &p)).unwrap();
            check_grad("down", &p.down, &g.down, |v| {
                loss(
                    &x,
                    &BottleneckParams {
                        down: v.to_vec(),
                        ..p.clone()
                    },
                )
            })
            .unwrap();
            check_grad("down_bias", &p.down_bias, &g.down_bias, |v| {
                loss(
                    &x,
                    &BottleneckParams {
                        down_bias: v.to_vec(),
                        ..p.clone()
                    },
                )
            })
            .unwrap();
            check_grad("up", &p.up, &g.up, |v| {
                loss(
                    &x,
                    &BottleneckParams {
                        up: v.to_vec(),
                        ..p.clone()
                    },
                )
            })
            .unwrap();
            check_grad("up_bias", &p.up_bias, &g.up_bias, |v| {
                loss(
                    &x,
                    &BottleneckParams {
                        up_bias: v.to_vec(),
                        ..p.clone()
                    },
                )
            })
            .unwrap();
            // A second call accumulates parameter gradients and, with Add, dx.
            let before = g.clone();
            let dx1 = dx.clone();
            backward(S, act, &x, &z, &p, &r, &mut dx, Accumulate::Add, &mut g).unwrap();
            for (a, b) in g.up.iter().zip(&before.up) {
                assert!((a - 2.0 * b).abs() < 1e-12);
            }
            for (a, b) in dx.iter().zip(&dx1) {
                assert!((a - 2.0 * b).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        let p = params(1);
        let (mut z, mut y) = (vec![0.0; 15], vec![0.0; 35]);
        let err = forward(S, Activation::Relu, &rand_vec(1, 34), &p, &mut z, &mut y).unwrap_err();
        assert!(err.to_string().contains("x of 35"), "{err}");
        let bad = BottleneckParams {
            up_bias: vec![0.0; 6],
            ..p
        };
        assert!(forward(S, Activation::Relu, &rand_vec(1, 35), &bad, &mut z, &mut y).is_err());
    }
}
