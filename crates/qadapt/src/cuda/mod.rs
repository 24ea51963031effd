//! The CUDA device: context, stream, properties and the kernels loaded from the embedded fatbins.
//! Everything here is safe code; the `unsafe` calls live in `launch`, the one door to the driver.

pub(crate) mod launch;
pub mod ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr};
use qadapt_kernels::{KernelName, Module};

use crate::error::{Error, Result};
use crate::plan::DeviceProps;

/// The device buffer type of every CUDA signature here, re-exported so that crates above qadapt
/// can name it without depending on cudarc themselves.
pub use cudarc::driver::CudaSlice as DeviceBuffer;
pub use launch::{EmulatorCounters, EmulatorMemory, MemoryScope};

/// Whether a GEMM operand is used as stored (`N`) or transposed (`T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// One CUDA device with its stream. Cheap to clone (shared handle). All of qadapt's work for this
/// device goes to one stream, so launches are ordered without extra synchronization.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    props: DeviceProps,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blas: OnceLock<std::result::Result<Arc<cudarc::cublas::CudaBlas>, String>>,
    /// The LoRA launches' scratch (u, g, split partial sums), grown on demand and reused by every
    /// later call on this device (all on the one stream, so reuse is ordered).
    lora_scratch: Mutex<launch::LoraScratch>,
    /// [`CudaDevice::hopper_kernels`].
    hopper: AtomicBool,
    /// The dynamic shared memory each kernel was opted in to (`function_with_smem`).
    smem_opt_in: Mutex<HashMap<&'static str, u32>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.inner.ordinal)
            .field("name", &self.inner.name)
            .field("props", &self.inner.props)
            .finish()
    }
}

impl CudaDevice {
    /// On the virtual device (`just vgpu`): the launches of `kernel` since the last
    /// [`reset_emulator_counters`](Self::reset_emulator_counters) and what the emulator counted
    /// in them (instructions and shared-memory wavefronts). `None` on a real GPU.
    pub fn emulator_counters(&self, kernel: KernelName) -> Option<(u64, EmulatorCounters)> {
        self.synchronize().ok()?;
        launch::emulator_counters(kernel.name)
    }

    /// Clears the virtual device's counters; `false` on a real GPU.
    pub fn reset_emulator_counters(&self) -> bool {
        self.synchronize().is_ok() && launch::reset_emulator_counters()
    }

    /// On the virtual device: the device memory its allocations (of the process, or of the
    /// calling thread) hold now and at their high-water mark (since the driver loaded or the last
    /// [`reset_emulator_memory_peak`](Self::reset_emulator_memory_peak)), after the queued work.
    /// `None` on a real GPU.
    pub fn emulator_memory(&self, scope: MemoryScope) -> Option<EmulatorMemory> {
        self.synchronize().ok()?;
        launch::emulator_memory(scope)
    }

    /// Restarts the virtual device's memory high-water marks (the process's and the calling
    /// thread's) from what is live now; `false` on a real GPU.
    pub fn reset_emulator_memory_peak(&self) -> bool {
        self.synchronize().is_ok() && launch::reset_emulator_memory_peak()
    }

    /// The most device memory this process's allocations held at once since the device was
    /// opened or the last [`reset_memory_peak`](Self::reset_memory_peak), after the queued work:
    /// on a GPU, the high-water mark of the stream-ordered allocations (every buffer qadapt
    /// allocates; not the managed memory of paged optimizer states, cuBLAS' workspace or the
    /// context); on the virtual device, of all its allocations
    /// ([`emulator_memory`](Self::emulator_memory)). `None` on a GPU without memory pools.
    pub fn memory_peak(&self) -> Result<Option<u64>> {
        self.synchronize()?;
        if let Some(m) = launch::emulator_memory(MemoryScope::Process) {
            return Ok(Some(m.peak));
        }
        launch::pool_peak(self)
    }

    /// Restarts [`memory_peak`](Self::memory_peak) from what is allocated now; `false` where
    /// nothing records a peak.
    pub fn reset_memory_peak(&self) -> Result<bool> {
        self.synchronize()?;
        if launch::reset_emulator_memory_peak() {
            return Ok(true);
        }
        launch::reset_pool_peak(self)
    }

    /// `(free, total)` bytes of device memory, as the driver reports them (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        Ok(self.inner.ctx.mem_get_info()?)
    }

    /// Opens device `ordinal`: checks that kernels were compiled, that the driver library loads,
    /// that the device exists and is sm_80 or newer.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        if !qadapt_kernels::COMPILED {
            return Err(Error::CudaNotCompiled);
        }
        if !launch::driver_library_present() {
            return Err(Error::NoDevice(
                "the CUDA driver library (libcuda.so) was not found".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoDevice(format!("the CUDA driver found no device ({e})")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice(format!(
                "asked for device {ordinal}, the driver sees {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(Error::NoDevice(format!(
                "device {ordinal} has compute capability {major}.{minor}; qadapt needs 8.0 or newer"
            )));
        }
        use cudarc::driver::sys::CUdevice_attribute as A;
        let props = DeviceProps {
            sm_count: ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            compute_capability: (major as u32, minor as u32),
            max_grid_x: ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)? as u32,
        };
        let name = ctx.name()?;
        let stream = ctx.new_stream()?;
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                ordinal,
                name,
                ctx,
                stream,
                props,
                modules: Mutex::new(HashMap::new()),
                blas: OnceLock::new(),
                lora_scratch: Mutex::new(launch::LoraScratch::default()),
                hopper: AtomicBool::new(
                    props.compute_capability == (9, 0)
                        && std::env::var("QADAPT_SM90A").map_or(true, |v| v != "0"),
                ),
                smem_opt_in: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// `cuda:N (name, sm_XY, S SMs)`.
    pub fn describe(&self) -> String {
        let p = &self.inner.props;
        format!(
            "cuda:{} ({}, sm_{}{}, {} SMs)",
            self.inner.ordinal,
            self.inner.name,
            p.compute_capability.0,
            p.compute_capability.1,
            p.sm_count
        )
    }

    /// The properties plans are made from.
    pub fn props(&self) -> DeviceProps {
        self.inner.props
    }

    /// The stream all of qadapt's work for this device goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.inner.stream.synchronize()?)
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.inner.stream.clone_htod(host)?)
    }

    /// Copies a device buffer to a new host vector (synchronizes the stream).
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.inner.stream.clone_dtoh(dev)?)
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        Ok(self.inner.stream.alloc_zeros(len)?)
    }

    /// Device-to-device copy of `src` into `dst` (same length): the bandwidth baseline of the
    /// memory-bound kernels' benchmarks.
    pub fn copy<T: DeviceRepr>(&self, src: &CudaSlice<T>, dst: &mut CudaSlice<T>) -> Result<()> {
        if src.len() != dst.len() {
            return Err(crate::error::shape_err("copy", src.len(), dst.len()));
        }
        Ok(self.inner.stream.memcpy_dtod(src, dst)?)
    }

    /// Milliseconds per call of `f`, timed with CUDA events on this device's stream over `iters`
    /// calls after one warm-up call. For benchmarks; `f` must only queue work on this stream.
    pub fn time_ms(&self, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        f()?;
        let stream = &self.inner.stream;
        let start = stream.record_event(Some(CU_EVENT_DEFAULT))?;
        for _ in 0..iters.max(1) {
            f()?;
        }
        let end = stream.record_event(Some(CU_EVENT_DEFAULT))?;
        end.synchronize()?;
        Ok(f64::from(start.elapsed_ms(&end)?) / iters.max(1) as f64)
    }

    /// `c[m, n] = alpha * op(a) · op(b) + beta * c` (row-major, bf16, f32 compute) with cuBLAS:
    /// `op(a)` is `[m, k]`, `op(b)` is `[k, n]`; [`Op::T`] means the operand is stored transposed
    /// (an nn.Linear weight `[n, k]` is `b` with `Op::T`). The dense matmul where nothing needs
    /// fusing, and the baseline the fused kernels are measured against.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(
        &self,
        a: &CudaSlice<half::bf16>,
        a_op: Op,
        b: &CudaSlice<half::bf16>,
        b_op: Op,
        c: &mut CudaSlice<half::bf16>,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        launch::gemm_bf16(self, a, a_op, b, b_op, c, (m, n, k), alpha, beta)
    }

    /// The cuBLAS handle of this device's stream, created on first use (cuBLAS is loaded at run
    /// time: a machine without libcublas gets a typed error here, nothing else changes).
    pub(crate) fn blas(&self) -> Result<Arc<cudarc::cublas::CudaBlas>> {
        self.inner
            .blas
            .get_or_init(|| {
                if !launch::cublas_library_present() {
                    return Err(
                        "the cuBLAS library (libcublas.so) was not found on the library path"
                            .into(),
                    );
                }
                cudarc::cublas::CudaBlas::new(self.inner.stream.clone())
                    .map(Arc::new)
                    .map_err(|e| {
                        format!(
                            "cuBLAS could not be loaded ({e}); is libcublas on the library path?"
                        )
                    })
            })
            .clone()
            .map_err(Error::Library)
    }

    /// The device's LoRA scratch, locked for one forward or backward.
    pub(crate) fn lora_scratch(&self) -> Result<std::sync::MutexGuard<'_, launch::LoraScratch>> {
        self.inner.lora_scratch.lock().map_err(|_| {
            crate::error::invalid("lora scratch", "a previous call panicked while holding it")
        })
    }

    /// Whether NF4 GEMMs may take the sm_90a kernels (`kernels/lora_sm90.cu`: TMA, mbarriers,
    /// wgmma) where their plan allows: on by default on a compute capability 9.0 device unless
    /// the environment sets `QADAPT_SM90A=0`.
    pub fn hopper_kernels(&self) -> bool {
        self.inner.hopper.load(Ordering::Relaxed)
    }

    /// Turns the sm_90a kernels on or off for this device (to compare them with the sm_80 path
    /// on one GPU). Turning them on is an error on a device that is not compute capability 9.0.
    pub fn set_hopper_kernels(&self, on: bool) -> Result<()> {
        if on && self.inner.props.compute_capability != (9, 0) {
            let (major, minor) = self.inner.props.compute_capability;
            return Err(crate::error::invalid(
                "sm_90a kernels",
                format!("the device has compute capability {major}.{minor}, they need 9.0"),
            ));
        }
        self.inner.hopper.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// The kernel `k`, loading its module from the embedded fatbin on first use.
    pub(crate) fn function(&self, k: KernelName) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.inner.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(k.module) {
                Some(m) => m.clone(),
                None => {
                    let image = Module::containing(k).ok_or(Error::CudaNotCompiled)?;
                    let m = self
                        .inner
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(image.fatbin.to_vec()))?;
                    modules.insert(k.module, m.clone());
                    m
                }
            }
        };
        Ok(module.load_function(k.name)?)
    }

    /// The kernel `k`, allowed `bytes` of dynamic shared memory (past the 48 KiB every kernel
    /// gets, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, set once per kernel and size).
    pub(crate) fn function_with_smem(&self, k: KernelName, bytes: u32) -> Result<CudaFunction> {
        let f = self.function(k)?;
        let mut set = self
            .inner
            .smem_opt_in
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if set.get(k.name).is_none_or(|&b| b < bytes) {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )?;
            set.insert(k.name, bytes);
        }
        Ok(f)
    }
}
