//! The virtual device: an H200 (sm_90, 132 SMs) as `cuDeviceGetAttribute` describes it.

/// The name `cuDeviceGetName` returns.
pub(crate) const NAME: &str = "NVIDIA H200 (qadapt virtual device)";
/// `cuDeviceTotalMem`: the H200's 141 GB (143771 MiB). Real allocations are capped lower (see
/// `memory::memory_limit`).
pub(crate) const TOTAL_MEM: usize = 143_771 << 20;
/// `cuDriverGetVersion`: a CUDA 13.0 driver.
pub(crate) const DRIVER_VERSION: i32 = 13000;

pub(crate) const SM_COUNT: u32 = 132;
pub(crate) const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub(crate) const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
pub(crate) const MAX_GRID: [u32; 3] = [i32::MAX as u32, 65535, 65535];
/// Shared memory a CTA gets without opting in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
pub(crate) const SMEM_DEFAULT: u32 = 48 << 10;
/// Shared memory a CTA may opt in to (227 KiB).
pub(crate) const SMEM_OPTIN: u32 = 227 << 10;
/// Shared memory of one SM (228 KiB), of which each resident CTA costs RESERVED_SMEM more.
pub(crate) const SMEM_PER_SM: u32 = 228 << 10;
pub(crate) const RESERVED_SMEM: u32 = 1 << 10;
pub(crate) const REGS_PER_SM: u32 = 65536;
pub(crate) const REGS_PER_BLOCK: u32 = 65536;
/// Registers are allocated to a warp in units of 256 (8 per thread).
pub(crate) const REG_UNIT_PER_THREAD: u32 = 8;
pub(crate) const MAX_THREADS_PER_SM: u32 = 2048;
pub(crate) const MAX_BLOCKS_PER_SM: u32 = 32;
pub(crate) const WARP: u32 = 32;

/// `cuDeviceGetAttribute` for the CUDA 13.0 attribute numbers (CUdevice_attribute in `cuda.h`):
/// `None` for a number that is not an attribute (CUDA_ERROR_INVALID_VALUE). Values are those of
/// an H200 SXM; the texture and surface limits are the sm_90 ones of the CUDA programming guide.
pub(crate) fn attribute(attr: i32) -> Option<i32> {
    Some(match attr {
        1 => MAX_THREADS_PER_BLOCK as i32,
        2 => MAX_BLOCK[0] as i32,
        3 => MAX_BLOCK[1] as i32,
        4 => MAX_BLOCK[2] as i32,
        5 => MAX_GRID[0] as i32,
        6 => MAX_GRID[1] as i32,
        7 => MAX_GRID[2] as i32,
        8 => SMEM_DEFAULT as i32,
        9 => 65536, // total constant memory
        10 => WARP as i32,
        11 => i32::MAX, // max pitch
        12 => REGS_PER_BLOCK as i32,
        13 => 1_980_000, // clock rate, kHz
        14 => 512,       // texture alignment
        15 => 1,         // GPU overlap
        16 => SM_COUNT as i32,
        17 => 0,       // kernel execution timeout
        18 => 0,       // integrated
        19 => 1,       // can map host memory
        20 => 0,       // compute mode: default
        21 => 131_072, // texture 1D width
        22 | 23 => 131_072,
        24..=26 => 16_384,
        27 | 28 => 32_768,
        29 => 2048,
        30 => 512,       // surface alignment
        31 => 1,         // concurrent kernels
        32 => 1,         // ECC enabled
        33 => 0x18,      // PCI bus id
        34 => 0,         // PCI device id
        35 => 0,         // TCC driver
        36 => 2_619_000, // memory clock, kHz
        37 => 6144,      // memory bus width, bits
        38 => 50 << 20,  // L2 cache
        39 => MAX_THREADS_PER_SM as i32,
        40 => 3, // async engines
        41 => 1, // unified addressing
        42 => 32_768,
        43 => 2048,
        44 => 1,
        45 | 46 => 32_768,
        47..=49 => 8192,
        50 => 0,  // PCI domain
        51 => 32, // texture pitch alignment
        52 | 53 => 32_768,
        54 => 2046,
        55..=57 => 32_768,
        58 | 59 => 16_384,
        60 => 16_384,
        61 => 32_768,
        62 => 2048,
        63 | 64 => 32_768,
        65 => 2048,
        66 | 67 => 32_768,
        68 => 2046,
        69 => 268_435_456,
        70 | 71 => 131_072,
        72 => 2_097_120,
        73 | 74 => 32_768,
        75 => 9, // compute capability major
        76 => 0, // minor
        77 => 32_768,
        78 => 1,      // stream priorities
        79 | 80 => 1, // global / local L1 cache
        81 => SMEM_PER_SM as i32,
        82 => REGS_PER_SM as i32,
        83 => 1, // managed memory
        84 => 0, // multi-GPU board
        85 => 0,
        86 => 0,      // host native atomics
        87 => 2,      // single to double precision ratio
        88 => 0,      // pageable memory access
        89 => 1,      // concurrent managed access
        90 => 1,      // compute preemption
        91 => 0,      // host pointer for registered memory
        92..=94 => 1, // stream memory operations
        95 => 1,      // cooperative launch
        96 => 0,      // cooperative multi-device launch (deprecated)
        97 => SMEM_OPTIN as i32,
        98 => 0,        // flush remote writes
        99 => 1,        // host register
        100 => 0,       // pageable access uses host page tables
        101 => 0,       // direct managed access from host
        102 => 1,       // virtual memory management
        103 => 1,       // POSIX fd handles
        104 | 105 => 0, // Win32 handles
        106 => MAX_BLOCKS_PER_SM as i32,
        107 => 1,           // generic compression
        108 => 34_078_720,  // max persisting L2
        109 => 134_213_632, // max access policy window
        110 => 1,           // GPUDirect RDMA with VMM
        111 => RESERVED_SMEM as i32,
        112 => 1, // sparse CUDA arrays
        113 => 1, // read-only host register
        114 => 1, // timeline semaphore interop
        115 => 1, // memory pools
        116 => 1, // GPUDirect RDMA
        117 => 1,
        118 => 100,
        119 => 1, // mempool handle types: POSIX fd
        120 => 1, // cluster launch
        121 => 1,
        122 | 123 => 1,
        124 => 1, // dma-buf
        125 => 1, // IPC events
        126 => 4, // memory sync domains
        127 => 1, // tensor map access
        128 => 0,
        129 => 1,  // unified function pointers
        130 => 0,  // NUMA config: none
        131 => -1, // NUMA id
        132 => 1,  // multicast
        133 => 0,  // MPS
        134 => -1, // host NUMA id
        135..=147 => 0,
        _ => return None,
    })
}

/// Registers a CTA of `threads` threads takes when each uses `regs`: allocated per warp, in
/// units of 8 per thread.
pub(crate) fn regs_per_block(regs: u32, threads: u32) -> u64 {
    let per_thread = regs.div_ceil(REG_UNIT_PER_THREAD) * REG_UNIT_PER_THREAD;
    u64::from(threads.div_ceil(WARP)) * u64::from(WARP) * u64::from(per_thread)
}

/// CTAs of `threads` threads using `regs` registers each and `smem` bytes of shared memory in
/// all that fit on one SM at once.
pub(crate) fn blocks_per_sm(regs: u32, threads: u32, smem: u32) -> u32 {
    if threads == 0 {
        return 0;
    }
    let warps = threads.div_ceil(WARP);
    let by_threads = MAX_THREADS_PER_SM / (warps * WARP);
    let by_regs = if regs == 0 {
        MAX_BLOCKS_PER_SM
    } else {
        (u64::from(REGS_PER_SM) / regs_per_block(regs, threads)) as u32
    };
    let by_smem = SMEM_PER_SM / (smem + RESERVED_SMEM);
    by_threads.min(by_regs).min(by_smem).min(MAX_BLOCKS_PER_SM)
}
