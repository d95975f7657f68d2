//! Backend selection: chosen at build time by cargo features, at run time by a name (`--backend`, `FORKRL_BACKEND`).
//!
//! burn 0.22 has no backend type parameter: a tensor lives on a runtime [`Device`], and autodiff is a device
//! decorator (`device.autodiff()`). This module maps forkrl's backend names to devices.
//!
//! | name   | burn device                         | cargo feature | runs on                                      |
//! |--------|-------------------------------------|---------------|----------------------------------------------|
//! | `cpu`  | `Device::flex()`                    | always        | any machine (pure Rust); see `docs/backends.md` |
//! | `wgpu` | `Device::wgpu(DeviceKind::DefaultDevice)` | `wgpu`  | a Vulkan/Metal/DX12 adapter, or Mesa's lavapipe on CPU |
//! | `cuda` | `Device::cuda(0)`                   | `cuda`        | an NVIDIA GPU                                |

use std::{fmt, str::FromStr};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Environment variable read by [`Backend::from_env`] (and so by the per-backend test suites).
pub const BACKEND_ENV: &str = "FORKRL_BACKEND";

/// A burn backend forkrl can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's `flex` CPU backend (the default).
    #[default]
    Cpu,
    /// burn's wgpu backend (WGSL shaders; Mesa lavapipe on CPU-only machines).
    Wgpu,
    /// burn's CUDA backend.
    Cuda,
}

impl Backend {
    /// Every backend forkrl knows, compiled in or not.
    pub const ALL: [Backend; 3] = [Backend::Cpu, Backend::Wgpu, Backend::Cuda];

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    /// The cargo feature that compiles this backend in (`None` for the always-present CPU backend).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Backend::Cpu => None,
            Backend::Wgpu => Some("wgpu"),
            Backend::Cuda => Some("cuda"),
        }
    }

    /// Whether this build contains the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Cpu => true,
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends compiled into this build.
    pub fn compiled() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// The burn device of this backend (without autodiff; call `.autodiff()` on it to train).
    ///
    /// Device creation is lazy in burn: a wgpu or CUDA device whose hardware is missing fails on first use.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] when the backend's cargo feature is not compiled in.
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Ok(Device::cuda(0)),
            #[allow(unreachable_patterns)]
            other => Err(Error::BackendUnavailable {
                name: other.name().to_string(),
                reason: format!(
                    "this build was compiled without the `{}` cargo feature (compiled in: {})",
                    other.feature().unwrap_or_default(),
                    Self::compiled().iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    /// The backend named by `FORKRL_BACKEND`, or the CPU backend when the variable is unset or empty.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] for an unknown name.
    pub fn from_env() -> Result<Backend> {
        match std::env::var(BACKEND_ENV) {
            Ok(name) if !name.trim().is_empty() => name.parse(),
            _ => Ok(Backend::Cpu),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|b| b.name() == wanted).ok_or_else(|| Error::BackendUnavailable {
            name: s.to_string(),
            reason: "unknown backend; expected one of cpu, wgpu, cuda".to_string(),
        })
    }
}

/// Whether tensors of `device` live on the Flex (CPU) backend, with or without autodiff: where the host-kernel
/// operations (`attention`, forkrl-advantage's fused PPO loss) run.
pub fn runs_on_flex(device: &burn::backend::DispatchDevice) -> bool {
    use burn::backend::DispatchDevice;
    #[allow(unreachable_patterns)]
    match device {
        DispatchDevice::Autodiff(inner) => runs_on_flex(&inner.clone().inner()),
        DispatchDevice::Flex(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>(), Ok(b));
            assert_eq!(b.to_string(), b.name());
        }
        assert_eq!(" WGPU ".parse::<Backend>(), Ok(Backend::Wgpu));
        let err = "tpu".parse::<Backend>().expect_err("unknown");
        assert!(err.to_string().contains("tpu"), "{err}");
    }

    #[test]
    fn cpu_is_always_compiled_and_missing_features_are_typed_errors() {
        assert!(Backend::Cpu.is_compiled());
        assert!(Backend::Cpu.device().is_ok());
        for b in Backend::ALL.into_iter().filter(|b| !b.is_compiled()) {
            match b.device() {
                Err(Error::BackendUnavailable { name, reason }) => {
                    assert_eq!(name, b.name());
                    assert!(reason.contains(b.feature().unwrap_or_default()));
                }
                other => panic!("{b}: unexpected {other:?}"),
            }
        }
    }
}
