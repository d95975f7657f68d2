//! Flex tensors as host buffers for the fused model operations' kernels ([`crate::attention`], [`crate::rms_norm`],
//! [`crate::swiglu`]).

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, TensorData};

/// `t` as a contiguous f32 tensor (a copy only for a strided or non-f32 input).
pub(crate) fn contiguous_f32(t: &FlexTensor) -> FlexTensor {
    let t = if t.dtype() == DType::F32 { t.clone() } else { Flex::float_cast(t.clone(), FloatDType::F32) };
    t.to_contiguous()
}

/// An all-NaN f32 tensor: a kernel's answer to an internal shape error (the callers check shapes first).
pub(crate) fn nan(shape: &[usize]) -> FlexTensor {
    let n = shape.iter().product();
    FlexTensor::from_data(TensorData::new(vec![f32::NAN; n], shape.to_vec()))
}
