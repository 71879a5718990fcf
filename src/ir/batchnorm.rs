//! Inference-mode BatchNormalization as the per-channel affine map
//! y = γ·(x − μ)/√(σ² + ε) + β: the one place its arithmetic is written
//! (fold, prune's importance and compensation, the training engine).
use std::ops::{Add, Div, Mul, Sub};

/// f32 or f64.
pub trait Real: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> {
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
}

/// The per-channel scale s = γ/√(σ² + ε).
pub fn scale<T: Real>(gamma: &[T], var: &[T], eps: T) -> Vec<T> {
    gamma.iter().zip(var).map(|(&g, &v)| channel_scale(g, v, eps)).collect()
}

/// One channel's scale γ/√(σ² + ε).
pub fn channel_scale<T: Real>(gamma: T, var: T, eps: T) -> T {
    gamma / (var + eps).sqrt()
}

/// One channel's output for input `x`.
pub fn apply<T: Real>(x: T, gamma: T, beta: T, mean: T, var: T, eps: T) -> T {
    (x - mean) * gamma / (var + eps).sqrt() + beta
}
