//! Where an op runs: the CPU (always), or a CUDA device when the kernels were compiled and a
//! driver and a device are present. Asking for CUDA never panics: it returns
//! [`Error::CudaNotCompiled`] or [`Error::NoDevice`].

use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

/// A compute device.
#[derive(Debug, Clone)]
pub enum Device {
    /// The host, all cores (rayon).
    Cpu,
    /// One CUDA device with its stream and loaded kernels.
    Cuda(CudaDevice),
}

impl Device {
    /// CUDA device `ordinal`.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(CudaDevice::new(ordinal)?))
    }

    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Device::cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Device::cuda(i),
                _ => Err(Error::Invalid {
                    op: "device",
                    reason: format!("unknown device {other:?} (use cpu, cuda or cuda:N)"),
                }),
            },
        }
    }

    /// A short name: `cpu` or `cuda:N (name)`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Cuda(d) => d.describe(),
        }
    }
}
