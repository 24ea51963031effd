//! Device memory: host memory from mmap, fenced by PROT_NONE guard pages, in a table.
//!
//! Every allocation (cuMemAlloc, cuMemAllocAsync, cuMemAllocManaged, cuMemHostAlloc) gets its own
//! mapping: one guard page, the data pages, one guard page. The buffer is placed so that its end,
//! rounded up to 16 bytes, is flush against the second guard page: the first byte past the
//! rounded end faults, and the start stays 16-byte aligned (the kernels' widest access). The
//! 0..15 slack bytes between the requested end and the rounded end hold a canary that is checked
//! after every launch. Fresh memory is filled with 0xFF bytes (a NaN in f32, bf16 and f16): the
//! real driver does not zero allocations, and a kernel that reads what nobody wrote should show it.
//!
//! Device addresses are host addresses (the virtual device has unified addressing), so kernels
//! and the host read the same bytes; copies and cuBLAS check their ranges against this table
//! first, and a kernel's stray access lands in a guard page, which the emulator reports.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

use crate::CUresult;

/// Byte of the slack between an allocation's requested and rounded ends. A moderate number in
/// f32 (0.046), bf16 (0.046) and f16 (1.31), so that a kernel's read-modify-write of a slack
/// element (`x[i] += d`, `p[i] *= decay`) changes it; a huge or NaN pattern would absorb the
/// update and hide the write.
const CANARY: u8 = 0x3D;
/// Byte fresh allocations are filled with.
const FILL: u8 = 0xFF;
/// Freed allocations remembered for fault messages (use after free).
const FREED_KEPT: usize = 4096;

/// How an allocation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Device,
    DeviceAsync,
    Managed,
    Host,
}

impl Kind {
    fn api(self) -> &'static str {
        match self {
            Kind::Device => "cuMemAlloc",
            Kind::DeviceAsync => "cuMemAllocAsync",
            Kind::Managed => "cuMemAllocManaged",
            Kind::Host => "cuMemHostAlloc",
        }
    }
}

/// One live (or remembered freed) allocation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Alloc {
    pub(crate) id: u64,
    pub(crate) base: u64,
    pub(crate) size: usize,
    pub(crate) kind: Kind,
    rounded: usize,
    map_base: usize,
    map_len: usize,
    /// [`thread_tag`] of the host thread that made it.
    thread: u64,
}

impl fmt::Display for Alloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "allocation #{} ({} bytes at {:#x}, allocated by {})",
            self.id,
            self.size,
            self.base,
            self.kind.api()
        )
    }
}

struct Table {
    live: BTreeMap<u64, Alloc>,
    freed: VecDeque<Alloc>,
    next_id: u64,
    used: usize,
    limit: usize,
    /// Bytes (requested sizes) of live device allocations: cuMemAlloc, cuMemAllocAsync and
    /// cuMemAllocManaged, not cuMemHostAlloc's pinned host memory.
    device_used: usize,
    /// The most `device_used` has been since the table was made or [`reset_device_peak`].
    device_peak: usize,
    /// `(live, peak)` device bytes per host thread (by [`thread_tag`]): what each thread
    /// allocated and has not freed (whichever thread frees it), and its high-water mark. Tests run
    /// in parallel threads of one process, which share this device: a test reads its own.
    per_thread: HashMap<u64, (usize, usize)>,
}

/// A number for the calling host thread, unique in the process (`ThreadId::as_u64` is unstable).
fn thread_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        live: BTreeMap::new(),
        freed: VecDeque::new(),
        next_id: 1,
        used: 0,
        limit: memory_limit(),
        device_used: 0,
        device_peak: 0,
        per_thread: HashMap::new(),
    })
});

fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// Bytes the virtual device may really hold at once: `QADAPT_VGPU_MEMORY` (bytes, or with a K, M
/// or G suffix), else half of the machine's physical memory.
fn memory_limit() -> usize {
    if let Ok(v) = std::env::var("QADAPT_VGPU_MEMORY") {
        let v = v.trim();
        let (num, mul) = match v.chars().last() {
            Some('K' | 'k') => (&v[..v.len() - 1], 1usize << 10),
            Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
            Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
            _ => (v, 1),
        };
        if let Ok(n) = num.trim().parse::<usize>() {
            return n.saturating_mul(mul);
        }
        eprintln!("qadapt-vgpu: QADAPT_VGPU_MEMORY={v:?} is not a size; using the default");
    }
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    if pages > 0 {
        (pages as usize).saturating_mul(page()) / 2
    } else {
        8 << 30
    }
}

/// Bytes in live allocations and the limit on them.
pub(crate) fn usage() -> (usize, usize) {
    let t = table();
    (t.used, t.limit)
}

/// `(live, peak)` bytes of device allocations (cuMemAlloc, cuMemAllocAsync, cuMemAllocManaged;
/// requested sizes, without the 16-byte rounding and guard pages): what a memory planner
/// predicts. Of the whole process, or (`thread_only`) of the allocations the calling host thread
/// made.
pub(crate) fn device_usage(thread_only: bool) -> (usize, usize) {
    let t = table();
    if thread_only {
        t.per_thread.get(&thread_tag()).copied().unwrap_or((0, 0))
    } else {
        (t.device_used, t.device_peak)
    }
}

/// Restarts the high-water marks of [`device_usage`] (the process's and the calling thread's)
/// from the bytes live now.
pub(crate) fn reset_device_peak() {
    let mut t = table();
    t.device_peak = t.device_used;
    if let Some((live, peak)) = t.per_thread.get_mut(&thread_tag()) {
        *peak = *live;
    }
}

/// A new allocation of `size` bytes (`size` > 0), filled with 0xFF.
pub(crate) fn allocate(size: usize, kind: Kind) -> Result<u64, CUresult> {
    let pg = page();
    let rounded = size
        .checked_add(15)
        .ok_or(CUresult::CUDA_ERROR_OUT_OF_MEMORY)?
        & !15;
    let data_pages = rounded.div_ceil(pg);
    let map_len = (data_pages + 2)
        .checked_mul(pg)
        .ok_or(CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
    {
        let t = table();
        if t.used.saturating_add(size) > t.limit {
            eprintln!(
                "qadapt-vgpu: {}({size}) refused: {} bytes in use, the virtual device's limit is {} \
                 (QADAPT_VGPU_MEMORY)",
                kind.api(),
                t.used,
                t.limit
            );
            return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        }
    }
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    let map_base = map as usize;
    let data_start = map_base + pg;
    // SAFETY: [data_start, data_start + data_pages * pg) lies inside the mapping made above.
    let rc = unsafe {
        libc::mprotect(
            data_start as *mut libc::c_void,
            data_pages * pg,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if rc != 0 {
        // SAFETY: unmapping exactly the mapping made above, which nothing else refers to.
        unsafe { libc::munmap(map, map_len) };
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    let data_end = data_start + data_pages * pg;
    let base = data_end - rounded;
    // SAFETY: [base, base + size) is inside the read-write data pages made above, which no one
    // else can know about yet.
    unsafe { std::ptr::write_bytes(base as *mut u8, FILL, size) };
    // SAFETY: [base + size, base + rounded) likewise.
    unsafe { std::ptr::write_bytes((base + size) as *mut u8, CANARY, rounded - size) };
    let mut t = table();
    let id = t.next_id;
    t.next_id += 1;
    t.used += size;
    let thread = thread_tag();
    if kind != Kind::Host {
        t.device_used += size;
        t.device_peak = t.device_peak.max(t.device_used);
        let (live, peak) = t.per_thread.entry(thread).or_insert((0, 0));
        *live += size;
        *peak = (*peak).max(*live);
    }
    let a = Alloc {
        id,
        base: base as u64,
        size,
        kind,
        rounded,
        map_base,
        map_len,
        thread,
    };
    t.live.insert(base as u64, a);
    // The emulator checks kernels' global accesses against the requested size, not the rounded.
    crate::abi::mem_register(base as u64, size);
    Ok(base as u64)
}

/// Frees the allocation that starts at `ptr` (one of `kinds`).
pub(crate) fn free(ptr: u64, kinds: &[Kind], api: &str) -> Result<(), CUresult> {
    let a = {
        let mut t = table();
        match t.live.get(&ptr) {
            Some(a) if kinds.contains(&a.kind) => {}
            Some(a) => {
                eprintln!(
                    "qadapt-vgpu: {api}({ptr:#x}): {a} cannot be freed by {api}: CUDA_ERROR_INVALID_VALUE"
                );
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            None => {
                eprintln!(
                    "qadapt-vgpu: {api}({ptr:#x}): not the start of a live allocation ({}): \
                     CUDA_ERROR_INVALID_VALUE",
                    describe_locked(&t, ptr)
                );
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
        }
        let a = t.live.remove(&ptr).expect("checked above");
        crate::abi::mem_unregister(ptr);
        t.used -= a.size;
        if a.kind != Kind::Host {
            t.device_used -= a.size;
            if let Some((live, _)) = t.per_thread.get_mut(&a.thread) {
                *live -= a.size;
            }
        }
        if t.freed.len() == FREED_KEPT {
            t.freed.pop_front();
        }
        t.freed.push_back(a);
        a
    };
    // SAFETY: the mapping of an allocation just removed from the table; no API hands its
    // address out any more (a kernel still using it is the program's bug and faults).
    unsafe { libc::munmap(a.map_base as *mut libc::c_void, a.map_len) };
    Ok(())
}

/// The live allocation holding `addr` (between its start and its requested end), if any.
pub(crate) fn find(addr: u64) -> Option<Alloc> {
    let t = table();
    find_locked(&t, addr)
}

fn find_locked(t: &Table, addr: u64) -> Option<Alloc> {
    let (_, a) = t.live.range(..=addr).next_back()?;
    (addr < a.base + a.size as u64).then_some(*a)
}

/// Whether `addr` is device memory or next to it: inside the mapping (guard pages included) of a
/// live or recently freed allocation.
pub(crate) fn near_allocation(addr: u64) -> bool {
    let t = table();
    let inside = |a: &Alloc| (a.map_base as u64..(a.map_base + a.map_len) as u64).contains(&addr);
    t.live
        .range(..=addr)
        .next_back()
        .is_some_and(|(_, a)| inside(a))
        || t.live.range(addr..).next().is_some_and(|(_, a)| inside(a))
        || t.freed.iter().any(inside)
}

/// Checks that `[addr, addr + len)` lies inside one live allocation; otherwise says on stderr what
/// it overlaps and returns CUDA_ERROR_INVALID_VALUE. `what` names the operand ("cuMemcpyHtoD
/// destination").
pub(crate) fn check_range(addr: u64, len: usize, what: &str) -> Result<Alloc, CUresult> {
    range(addr, len).map_err(|why| {
        eprintln!("qadapt-vgpu: {what}: {why}: CUDA_ERROR_INVALID_VALUE");
        CUresult::CUDA_ERROR_INVALID_VALUE
    })
}

/// The live allocation holding all of `[addr, addr + len)`, or why there is none.
pub(crate) fn range(addr: u64, len: usize) -> Result<Alloc, String> {
    let t = table();
    if let Some(a) = find_locked(&t, addr) {
        let off = addr - a.base;
        if off
            .checked_add(len as u64)
            .is_some_and(|end| end <= a.size as u64)
        {
            return Ok(a);
        }
        return Err(format!(
            "{len} bytes at {addr:#x} (offset {off} of {a}) run {} bytes past its end",
            (off as u128 + len as u128 - a.size as u128)
        ));
    }
    Err(format!(
        "{len} bytes at {addr:#x}: {}",
        describe_locked(&t, addr)
    ))
}

/// Where `addr` is, in words, for a fault message: inside, before or past the end of which
/// allocation, in a freed one, or nowhere near any.
pub(crate) fn describe(addr: u64) -> String {
    let t = table();
    describe_locked(&t, addr)
}

fn describe_locked(t: &Table, addr: u64) -> String {
    if let Some(a) = find_locked(t, addr) {
        return format!("offset {} of {a}", addr - a.base);
    }
    // Past the end or before the start of a live allocation: inside its mapping (guard pages
    // and slack).
    let near = t
        .live
        .range(..=addr)
        .next_back()
        .into_iter()
        .chain(t.live.range(addr..).next())
        .map(|(_, a)| a)
        .find(|a| (a.map_base as u64..(a.map_base + a.map_len) as u64).contains(&addr));
    if let Some(a) = near {
        return if addr >= a.base + a.size as u64 {
            let past = addr - (a.base + a.size as u64);
            format!(
                "{} the end of {a}, at offset {}",
                if past == 0 {
                    "just past".to_string()
                } else {
                    format!("{past} bytes past")
                },
                addr - a.base
            )
        } else {
            format!("{} bytes before the start of {a}", a.base - addr)
        };
    }
    if let Some(a) = t
        .freed
        .iter()
        .rev()
        .find(|a| (a.map_base as u64..(a.map_base + a.map_len) as u64).contains(&addr))
    {
        return format!(
            "offset {} of the freed {a} (use after free)",
            addr as i128 - a.base as i128
        );
    }
    if addr < 1 << 16 {
        return format!("a null pointer plus {addr}: not device memory");
    }
    let nearest = t
        .live
        .values()
        .min_by_key(|a| {
            if addr < a.base {
                a.base - addr
            } else {
                addr - (a.base + a.size as u64)
            }
        })
        .map(|a| format!(" (nearest: {a})"))
        .unwrap_or_default();
    format!("not inside any allocation{nearest}")
}

/// Allocations whose slack canary was overwritten: `(allocation, first bad offset)`. Each one is
/// re-armed so that it is reported once.
pub(crate) fn check_canaries() -> Vec<(Alloc, usize)> {
    let t = table();
    let mut bad = Vec::new();
    for a in t.live.values() {
        let slack = a.rounded - a.size;
        if slack == 0 {
            continue;
        }
        // SAFETY: [base + size, base + rounded) is inside the allocation's read-write pages, and
        // the table lock keeps it from being freed meanwhile.
        let bytes =
            unsafe { std::slice::from_raw_parts((a.base as usize + a.size) as *const u8, slack) };
        if let Some(i) = bytes.iter().position(|&b| b != CANARY) {
            bad.push((*a, a.size + i));
            // SAFETY: as above, the slack of a live allocation; writing it back re-arms the check.
            unsafe { std::ptr::write_bytes((a.base as usize + a.size) as *mut u8, CANARY, slack) };
        }
    }
    bad
}

/// Every live allocation (for pointer attribute queries and tests).
pub(crate) fn live_count() -> usize {
    table().live.len()
}
