//! Driver objects (contexts, streams, events, modules, functions, cuBLAS handles) and the
//! calling thread's context stack.
//!
//! Handles given to the caller are not pointers but tagged numbers, `tag << 48 | id`: a handle of
//! the wrong kind, a destroyed one or a made-up one is CUDA_ERROR_INVALID_HANDLE (or
//! CUDA_ERROR_INVALID_CONTEXT), never a wild dereference.
//!
//! Sticky errors: a launch that faults (or a cuBLAS call that reads out of bounds) leaves its
//! context in the error state of the real driver: every later call that works in that context
//! returns the same error. The real driver keeps it until the process exits; here it is cleared
//! when the primary context's last user releases it (or by cuDevicePrimaryCtxReset), so that a
//! test process can go on after a test that provoked a fault on purpose.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::CUresult;
use crate::image::Resources;

pub(crate) const TAG_CTX: u64 = 0xC0;
pub(crate) const TAG_STREAM: u64 = 0xC1;
pub(crate) const TAG_EVENT: u64 = 0xC2;
pub(crate) const TAG_MODULE: u64 = 0xC3;
pub(crate) const TAG_FUNC: u64 = 0xC4;
pub(crate) const TAG_BLAS: u64 = 0xC5;

/// The special stream handles of `cuda.h`.
pub(crate) const STREAM_LEGACY: u64 = 0x1;
pub(crate) const STREAM_PER_THREAD: u64 = 0x2;

#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) primary: bool,
    /// Retains of the primary context; 0 means inactive (released by everyone).
    pub(crate) refcount: u32,
    pub(crate) sticky: Option<CUresult>,
    pub(crate) flags: u32,
    pub(crate) limits: HashMap<i32, usize>,
    pub(crate) cache_config: i32,
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) ctx: u64,
    pub(crate) flags: u32,
    pub(crate) priority: i32,
}

#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) ctx: u64,
    pub(crate) flags: u32,
    pub(crate) recorded: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Module {
    pub(crate) ctx: u64,
    /// Emulated kernels whose symbol the image holds.
    pub(crate) kernels: Vec<String>,
    /// PTX texts of the image (for `.maxntid`).
    pub(crate) ptx: Vec<String>,
    pub(crate) functions: HashMap<String, u64>,
}

#[derive(Debug)]
pub(crate) struct Function {
    pub(crate) module: u64,
    pub(crate) name: CString,
    pub(crate) args_size: usize,
    /// ptxas' sm_90 report for this kernel, if the real build has one.
    pub(crate) res: Option<Resources>,
    /// `.maxntid` / `.reqntid` of the PTX, as a thread count.
    pub(crate) max_ntid: Option<u32>,
    /// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES.
    pub(crate) max_dyn_smem: u32,
    /// CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT.
    pub(crate) carveout: i32,
    pub(crate) cache_config: i32,
}

#[derive(Debug)]
pub(crate) struct Blas {
    pub(crate) ctx: u64,
    pub(crate) stream: u64,
    pub(crate) pointer_mode: i32,
    pub(crate) math_mode: i32,
    pub(crate) atomics_mode: i32,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) initialized: bool,
    next: u64,
    pub(crate) primary: u64,
    pub(crate) contexts: HashMap<u64, Context>,
    pub(crate) streams: HashMap<u64, Stream>,
    pub(crate) events: HashMap<u64, Event>,
    pub(crate) modules: HashMap<u64, Module>,
    pub(crate) functions: HashMap<u64, Function>,
    pub(crate) blas: HashMap<u64, Blas>,
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| Mutex::new(State::default()));

/// The driver's objects, locked.
pub(crate) fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// The calling thread's context stack (its top is the current context).
    static CTX_STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context (0 if none).
pub(crate) fn current_raw() -> u64 {
    CTX_STACK.with(|s| s.borrow().last().copied().unwrap_or(0))
}

/// `cuCtxSetCurrent`: replaces the top of the stack, or pops it for 0.
pub(crate) fn set_current(ctx: u64) {
    CTX_STACK.with(|s| {
        let mut s = s.borrow_mut();
        s.pop();
        if ctx != 0 {
            s.push(ctx);
        }
    });
}

pub(crate) fn push_current(ctx: u64) {
    CTX_STACK.with(|s| s.borrow_mut().push(ctx));
}

pub(crate) fn pop_current() -> u64 {
    CTX_STACK.with(|s| s.borrow_mut().pop().unwrap_or(0))
}

impl State {
    /// A fresh handle of kind `tag`.
    pub(crate) fn handle(&mut self, tag: u64) -> u64 {
        self.next += 1;
        (tag << 48) | self.next
    }

    /// CUDA_ERROR_NOT_INITIALIZED before cuInit.
    pub(crate) fn check_init(&self) -> Result<(), CUresult> {
        if self.initialized {
            Ok(())
        } else {
            Err(CUresult::CUDA_ERROR_NOT_INITIALIZED)
        }
    }

    /// `ctx` is a live context without a sticky error.
    pub(crate) fn check_ctx(&self, ctx: u64) -> Result<(), CUresult> {
        match self.contexts.get(&ctx) {
            Some(c) if c.primary && c.refcount == 0 => Err(CUresult::CUDA_ERROR_INVALID_CONTEXT),
            Some(c) => match c.sticky {
                Some(e) => Err(e),
                None => Ok(()),
            },
            None => Err(CUresult::CUDA_ERROR_INVALID_CONTEXT),
        }
    }

    /// The calling thread's current context, checked (initialized, bound, alive, no sticky
    /// error).
    pub(crate) fn current(&self) -> Result<u64, CUresult> {
        self.check_init()?;
        let ctx = current_raw();
        if ctx == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        self.check_ctx(ctx)?;
        Ok(ctx)
    }

    /// The context a stream handle works in (the current one for the NULL, legacy and
    /// per-thread streams), checked.
    pub(crate) fn stream_ctx(&self, stream: u64) -> Result<u64, CUresult> {
        if matches!(stream, 0 | STREAM_LEGACY | STREAM_PER_THREAD) {
            return self.current();
        }
        self.check_init()?;
        let s = self
            .streams
            .get(&stream)
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        self.check_ctx(s.ctx)?;
        Ok(s.ctx)
    }

    /// Puts `ctx` in the sticky error state `e`.
    pub(crate) fn poison(&mut self, ctx: u64, e: CUresult) {
        if let Some(c) = self.contexts.get_mut(&ctx) {
            c.sticky.get_or_insert(e);
        }
    }
}

impl Context {
    pub(crate) fn new(primary: bool, flags: u32) -> Context {
        Context {
            primary,
            refcount: 0,
            sticky: None,
            flags,
            limits: HashMap::new(),
            cache_config: 0,
        }
    }
}
