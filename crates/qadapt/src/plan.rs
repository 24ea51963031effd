//! Launch geometry as pure functions of the shape and the device: `plan(shape, props) ->
//! LaunchPlan`. Kept apart from the launch layer so every branch is unit-tested on the CPU.

use crate::error::{Result, invalid};
use qadapt_kernels::ffi;

/// The device facts a plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceProps {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Compute capability, e.g. (9, 0).
    pub compute_capability: (u32, u32),
    /// Largest grid x dimension.
    pub max_grid_x: u32,
}

impl DeviceProps {
    /// An H200-like device (132 SMs, sm_90), for tests and documentation.
    pub const H200: DeviceProps = DeviceProps {
        sm_count: 132,
        compute_capability: (9, 0),
        max_grid_x: i32::MAX as u32,
    };
}

/// Grid and block of one launch, and its dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Thread blocks along x.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

impl LaunchPlan {
    /// As cudarc's launch configuration.
    pub fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: self.shared_bytes,
        }
    }
}

/// Enough CTAs to fill every SM several times; the kernels grid-stride past this.
fn capped_grid(work_ctas: u64, props: &DeviceProps) -> u32 {
    let cap = u64::from(props.sm_count.max(1)) * 32;
    work_ctas.clamp(1, cap.min(u64::from(props.max_grid_x))) as u32
}

/// `nf4_quantize_*`: one warp per NF4 block, 8 warps per CTA.
pub fn nf4_quantize(n: u64, blocksize: u32, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("nf4 quantize plan", "empty tensor"));
    }
    let nblocks = n.div_ceil(u64::from(blocksize));
    Ok(LaunchPlan {
        grid: capped_grid(nblocks.div_ceil(8), props),
        block: 256,
        shared_bytes: 0,
    })
}

/// `nf4_dequantize_*`: one thread per 32 elements (a 16-byte load of codes), 256 threads a CTA.
pub fn nf4_dequantize(n: u64, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("nf4 dequantize plan", "empty tensor"));
    }
    let groups = n.div_ceil(32);
    Ok(LaunchPlan {
        grid: capped_grid(groups.div_ceil(256), props),
        block: 256,
        shared_bytes: 0,
    })
}

/// The three double-quant launches: partial sums, offset, encode.
pub fn nf4_double_quant(nblocks: u64, props: &DeviceProps) -> Result<[LaunchPlan; 3]> {
    if nblocks == 0 {
        return Err(invalid("nf4 double quant plan", "no blocks"));
    }
    let chunks = nblocks.div_ceil(u64::from(ffi::QADAPT_DQ_SUM_CHUNK));
    let nested = nblocks.div_ceil(u64::from(ffi::QADAPT_DQ_BLOCK));
    Ok([
        LaunchPlan {
            grid: capped_grid(chunks, props),
            block: ffi::QADAPT_DQ_SUM_THREADS,
            shared_bytes: 0,
        },
        LaunchPlan {
            grid: 1,
            block: 32,
            shared_bytes: 0,
        },
        LaunchPlan {
            grid: capped_grid(nested, props),
            block: ffi::QADAPT_DQ_BLOCK,
            shared_bytes: 0,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: DeviceProps = DeviceProps {
        sm_count: 2,
        compute_capability: (8, 0),
        max_grid_x: 10,
    };

    #[test]
    fn quantize_plan_one_warp_per_block_and_capped() {
        let p = nf4_quantize(1000, 64, &DeviceProps::H200).unwrap();
        assert_eq!((p.grid, p.block), (2, 256)); // 16 blocks / 8 warps
        let p = nf4_quantize(1, 4096, &DeviceProps::H200).unwrap();
        assert_eq!(p.grid, 1);
        let p = nf4_quantize(1 << 40, 64, &DeviceProps::H200).unwrap();
        assert_eq!(p.grid, 132 * 32);
        assert_eq!(nf4_quantize(1 << 20, 32, &SMALL).unwrap().grid, 10);
        assert!(nf4_quantize(0, 64, &SMALL).is_err());
    }

    #[test]
    fn dequantize_plan_covers_every_group_of_32() {
        let p = nf4_dequantize(32 * 256 * 3 + 1, &DeviceProps::H200).unwrap();
        assert_eq!(p.grid, 4);
        assert_eq!(nf4_dequantize(1, &DeviceProps::H200).unwrap().grid, 1);
        assert!(nf4_dequantize(0, &SMALL).is_err());
    }

    #[test]
    fn double_quant_plans_match_the_abi_constants() {
        let [sum, off, enc] = nf4_double_quant(5000, &DeviceProps::H200).unwrap();
        assert_eq!((sum.grid, sum.block), (3, ffi::QADAPT_DQ_SUM_THREADS));
        assert_eq!(off.grid, 1);
        assert_eq!((enc.grid, enc.block), (20, 256));
        assert!(nf4_double_quant(0, &SMALL).is_err());
    }
}
