//! Gradient norm and clipping by the **global** L2 norm, as `torch.nn.utils.clip_grad_norm_` (verl `grad_clip`, TRL
//! `max_grad_norm`):
//!
//! ```text
//! ‖g‖ = sqrt(Σ_p Σ_i g_{p,i}²)      g ← g · min(1, max_norm / (‖g‖ + 1e-6))
//! ```
//!
//! burn's `GradientClippingConfig::Norm` clips each parameter tensor by its own norm, which is a different update. The
//! squared sums are reduced on the device and read back as one small vector (one number per parameter tensor), so no
//! gradient is copied to the host. A non-finite norm is reported (verl skips such a step; the trainer stops with a
//! typed error instead, since an RLVR run that produced one is broken).

use burn::{
    module::{Module, ModuleVisitor, Param, ParamId},
    optim::GradientsParams,
    tensor::Tensor,
};

use crate::Result;

/// torch's `clip_grad_norm_` guard against dividing by a zero norm.
const CLIP_EPS: f64 = 1e-6;

/// The global L2 norm of the gradients of `module`'s float parameters (those without a gradient count 0), in f64 over
/// per-tensor f32 sums of squares reduced on the device. `NaN`/`inf` when a gradient is non-finite.
///
/// # Errors
/// A device read-back error.
pub fn global_grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> Result<f64> {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        sums: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.sums.push(g.clone().mul(g).sum());
            }
        }
    }
    let mut visitor = SumSquares { grads, sums: Vec::new() };
    module.visit(&mut visitor);
    if visitor.sums.is_empty() {
        return Ok(0.0);
    }
    let sums = crate::host_f32(Tensor::cat(visitor.sums, 0))?;
    Ok(sums.iter().map(|&s| f64::from(s)).sum::<f64>().sqrt())
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))` where `norm` is [`global_grad_norm`] (passed in, so
/// it is computed once); returns the gradients unchanged when the factor is 1 or the norm is not finite.
pub fn clip_grad_norm<M: Module>(module: &M, grads: GradientsParams, norm: f64, max_norm: f64) -> GradientsParams {
    let coef = max_norm / (norm + CLIP_EPS);
    if !norm.is_finite() || coef >= 1.0 {
        return grads;
    }
    struct Scale {
        grads: GradientsParams,
        coef: f32,
        ids: Vec<ParamId>,
    }
    impl ModuleVisitor for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.ids.contains(&param.id) {
                return; // a tied parameter visited twice is scaled once
            }
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register::<D>(param.id, g.mul_scalar(self.coef));
                self.ids.push(param.id);
            }
        }
    }
    let mut visitor = Scale { grads, coef: coef as f32, ids: Vec::new() };
    module.visit(&mut visitor);
    visitor.grads
}

#[cfg(test)]
mod tests {
    use burn::{
        module::Module,
        nn::{Linear, LinearConfig},
        tensor::{Device, Tensor, TensorData},
    };

    use super::*;

    #[derive(Module, Debug)]
    struct Two {
        a: Linear,
        b: Linear,
    }

    /// Gradients 3 on every entry of `a` (4 entries) and 4 on every entry of `b` (4 entries): per-tensor norms 6 and
    /// 8, global norm 10.
    fn case() -> (Two, GradientsParams) {
        let device = Device::flex().autodiff();
        let linear = || LinearConfig::new(2, 2).with_bias(false).init(&device);
        let m = Two { a: linear(), b: linear() };
        let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 1.0], [1, 2]), &device);
        // d/dW of sum(W x) with x = 1 is 1 per entry: scale the two outputs to get 3 and 4.
        let loss = m.a.forward(x.clone()).sum().mul_scalar(3.0) + m.b.forward(x).sum().mul_scalar(4.0);
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        (m, grads)
    }

    fn values(m: &Two, grads: &GradientsParams) -> (Vec<f32>, Vec<f32>) {
        let get = |id| crate::host_f32(grads.get::<2>(id).expect("has a gradient")).expect("reads");
        (get(m.a.weight.id), get(m.b.weight.id))
    }

    #[test]
    fn global_norm_clip_scales_every_tensor_by_one_factor() {
        let (m, grads) = case();
        let norm = global_grad_norm(&m, &grads).expect("reads");
        assert!((norm - 10.0).abs() < 1e-5, "{norm}");
        let clipped = clip_grad_norm(&m, grads, norm, 5.0);
        let (a, b) = values(&m, &clipped);
        // Global clipping halves both (3 → 1.5, 4 → 2); burn's per-tensor Norm(5) would leave `a` (norm 6 → 5)
        // at 2.5 and `b` (8 → 5) at 2.5: a different direction.
        assert!(a.iter().all(|v| (v - 1.5).abs() < 1e-5), "{a:?}");
        assert!(b.iter().all(|v| (v - 2.0).abs() < 1e-5), "{b:?}");
        assert!((global_grad_norm(&m, &clipped).expect("reads") - 5.0).abs() < 1e-4);
    }

    #[test]
    fn below_the_threshold_nothing_changes() {
        let (m, grads) = case();
        let clipped = clip_grad_norm(&m, grads, 10.0, 100.0);
        let (a, b) = values(&m, &clipped);
        assert!(a.iter().all(|&v| v == 3.0) && b.iter().all(|&v| v == 4.0));
    }
}
