//! The device-memory high-water mark of a real GPU: cudarc allocates stream-ordered
//! (`cuMemAllocAsync`) from the device's default memory pool wherever the device supports pools,
//! and the pool keeps the most bytes its allocations ever held (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`),
//! resettable. (The virtual device answers from its own allocation table instead: `counters`.)

use cudarc::driver::sys::{self, CUdevice_attribute, CUmemPool_attribute, CUmemoryPool, CUresult};

use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

fn check(what: &str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Library(format!("{what} failed: {r:?}")))
    }
}

/// The default memory pool of `dev`'s device, or `None` where the device has no memory pools
/// (cudarc then allocates with plain `cuMemAlloc`, which no pool counts).
fn default_pool(dev: &CudaDevice) -> Result<Option<CUmemoryPool>> {
    let ctx = &dev.inner.ctx;
    let pools = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)?;
    if pools == 0 {
        return Ok(None);
    }
    ctx.bind_to_thread()?;
    let mut pool: CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a valid out-pointer and the device of a live context (bound to this thread).
    check("cuDeviceGetDefaultMemPool", unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
    })?;
    Ok(Some(pool))
}

/// The most bytes the stream-ordered allocations of `dev` held at once since the pool was made or
/// the last [`reset_pool_peak`]; `None` without memory pools.
pub(crate) fn pool_peak(dev: &CudaDevice) -> Result<Option<u64>> {
    let Some(pool) = default_pool(dev)? else {
        return Ok(None);
    };
    let mut v: u64 = 0;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; `v` is a valid u64 out-parameter.
    check("cuMemPoolGetAttribute", unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v as *mut u64).cast(),
        )
    })?;
    Ok(Some(v))
}

/// Restarts the pool's high-water mark from what it holds now; `false` without memory pools.
pub(crate) fn reset_pool_peak(dev: &CudaDevice) -> Result<bool> {
    let Some(pool) = default_pool(dev)? else {
        return Ok(false);
    };
    let mut zero: u64 = 0;
    // SAFETY: USED_MEM_HIGH may only be set to 0 (a reset), as a cuuint64_t; `zero` is a valid
    // u64 the driver reads.
    check("cuMemPoolSetAttribute", unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    })?;
    Ok(true)
}
