/*
 * vgpu_runtime.cpp — the runtime of the kernel emulator: runs the kernels of kernels/<name>.cu,
 * compiled as host C++ against cuda_emu.h, over a grid of CTAs whose threads are fibers, behind the
 * C ABI of vgpu_abi.h (used by crates/qadapt-vgpu) and emu::launch (cuda_emu_runtime.h, for the
 * small runners).
 *
 * Threads. A launch's CTAs are taken one at a time, in blockIdx order, by the calling host thread
 * and qv_set_workers(n) - 1 pool threads. A CTA runs to its end on the host thread that took it,
 * as blockDim.x*y*z fibers with 64 KiB stacks (a PROT_NONE guard page below each), switched by a
 * hand-written x86-64 context switch that saves the callee-saved registers and rsp (a thread
 * blocking and resuming costs about 20 ns; -DQV_USE_UCONTEXT selects swapcontext instead, ten
 * times slower for its sigprocmask system call, and the fallback on other architectures).
 *
 * Scheduling. Fibers run cooperatively: a fiber runs until it blocks at __syncthreads, at a warp
 * collective (shuffle, __syncwarp, vote, ldmatrix, mma) or ends, then switches directly to the
 * next fiber of the scheduler's pass. A pass takes the warps one at a time and runs each as far as
 * it can go, normally to its next __syncthreads (its lanes one after another, from collective to
 * collective); the barrier's completion ends the pass. The warp order changes at every barrier:
 * ascending or descending warp index, alternating with the barrier interval and with the CTA
 * index, rotated by a number of warps that depends on both. Within one barrier interval one warp's
 * whole work thus runs before or after another's, the largest skew real warps can show, and over
 * two intervals (or two CTAs) in both orders: a missing __syncthreads between a store to shared
 * memory and another warp's load (read-after-write), or between a load and another warp's next
 * store (write-after-read), yields wrong data as soon as the harmful order comes up. A scheduler
 * advancing all warps in lockstep, one collective at a time, would hide races between phases of a
 * kernel, and one fixed order would hide one direction of each. Lanes of a warp also run one after
 * another between collectives, so code relying on lockstep lanes without __syncwarp is exposed too
 * (Volta and later do not run lanes in lockstep). The order is deterministic: a failure reproduces.
 *
 * Barriers. __syncthreads completes when all threads of the CTA have arrived. A thread that exits
 * while others wait, or arrives when the others have exited, is reported as QV_BARRIER_DEADLOCK:
 * __syncthreads is bar.sync 0 = barrier.sync.aligned, which CUDA allows only where the whole CTA
 * reaches it (the hardware releases a barrier held up only by exited threads, but code relying on
 * that is outside the contract). A warp collective completes when every lane its mask names (for
 * ldmatrix and mma all 32) has arrived at the same instruction kind with the same mask; lanes
 * disagreeing are a QV_PTX_ERROR; a named lane that has exited, or a state where no fiber can run,
 * is a QV_BARRIER_DEADLOCK naming how many threads arrived where. The launch is then abandoned:
 * the other CTAs are not started, the fibers' stacks are reused by the next launch.
 *
 * Faults. SIGSEGV/SIGBUS while a CTA runs (the driver surrounds device allocations with guard
 * pages) end the launch with QV_MEMORY_FAULT, the address, CTA and thread; SIGFPE, SIGILL and
 * SIGABRT (a host assert) with QV_TRAP. The handler runs on an alternate signal stack, finds the
 * faulting host thread in a table (by gettid, async-signal-safe), and siglongjmps back to the
 * scheduler; a signal outside a launch goes to the handler installed before ours (Rust's
 * stack-overflow handler, or the default action).
 *
 * Memory model. Shared memory is per host thread (cuda_emu.h); dynamic shared memory is a per
 * executor buffer poisoned with 0xff at each CTA start. cp.async copies land at the wait that
 * retires their group (qadapt_mma.cuh in this directory).
 *
 * sm_90a (qadapt_sm90.cuh in this directory, kernels/emu/README.md). A thread also blocks in an
 * mbarrier wait (St::AtMbar, made runnable when the phase completes) and at a wgmma, a warpgroup
 * collective: its warp arrives as at a warp collective, then waits for the other three warps of
 * the group. TMA data lands when its mbarrier phase has all arrivals and is observed; wgmma results
 * when a wgmma.wait_group retires their group.
 */
#undef _FORTIFY_SOURCE
#include "cuda_emu.h"
#include "vgpu_abi.h"
#include "vgpu_tmap.h"

#include <atomic>
#include <condition_variable>
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <deque>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(QV_USE_UCONTEXT)
#define QV_USE_UCONTEXT 1
#endif
#ifdef QV_USE_UCONTEXT
#include <ucontext.h>
#endif

namespace qv {
struct Fiber;
}
extern "C" {
void qv_ctx_swap(void** save_sp, void* new_sp) __attribute__((visibility("hidden")));
void qv_fiber_entry() __attribute__((visibility("hidden")));
__attribute__((visibility("hidden"), noreturn)) void qv_fiber_main(qv::Fiber* f);
}

namespace qv {

constexpr uint32_t kMaxThreads = 1024;
constexpr uint32_t kGuard = 4096;
constexpr uint8_t kPoison = 0xff;

/* AtWarp: at a warp collective (or at a wgmma, the warpgroup collective, waiting for the other
 * warps of its group); AtMbar: in mbarrier.try_wait, blocked until the phase completes. */
enum class St : uint8_t { Runnable, AtBarrier, AtWarp, AtMbar, Done };
enum class Op : uint8_t { None, Shfl, SyncWarp, Ballot, Ldmatrix, Mma, Wgmma };

const char* op_name(Op op, uint32_t variant) {
    switch (op) {
        case Op::Shfl: return "a shuffle (__shfl*_sync)";
        case Op::SyncWarp: return "__syncwarp";
        case Op::Ballot: return "a vote (__ballot/__any/__all_sync)";
        case Op::Ldmatrix:
            switch (variant) {
                case 2: return "ldmatrix.x1";
                case 3: return "ldmatrix.x1.trans";
                case 4: return "ldmatrix.x2";
                case 5: return "ldmatrix.x2.trans";
                case 8: return "ldmatrix.x4";
                default: return "ldmatrix.x4.trans";
            }
        case Op::Mma: return variant ? "mma.sync.m16n8k16.f16" : "mma.sync.m16n8k16.bf16";
        case Op::Wgmma:
            switch (variant) {
                case 64: return "wgmma.mma_async.m64n64k16.bf16";
                case 128: return "wgmma.mma_async.m64n128k16.bf16";
                default: return "wgmma.mma_async.m64n256k16.bf16";
            }
        default: return "nothing";
    }
}

struct Pending {
    uint8_t* dst;
    uint32_t size;
    uint64_t group;
    alignas(16) uint8_t data[16];
};

struct LaneSlot {
    uint64_t in, out;
    int32_t src;
    const void* addr;
    uint32_t* regs;
    float* d;
    uint32_t a[4], b[2];
    float c[4];
};

struct Warp {
    uint32_t exists;  /* lanes present in the CTA */
    uint32_t exited;  /* lanes that ended */
    uint32_t arrived; /* lanes waiting at the pending collective */
    uint32_t mask;    /* lanes the pending collective names */
    Op op;
    uint32_t variant;
    LaneSlot slot[32];
};

struct Launch;
struct Executor;
struct MemCheck;

struct Fiber {
#ifdef QV_USE_UCONTEXT
    ucontext_t uc;
#else
    void* sp;
#endif
    uint8_t* region; /* kStackSize bytes, aligned to kStackSize; guard page at the bottom */
    FiberHdr* hdr;
    Executor* ex;
    uint32_t linear, warp, lane;
    St state;
    uint64_t committed; /* cp.async groups committed so far = the id of the open group */
    std::vector<Pending> pend;
    /* sm_90a */
    uint32_t wait_bar = 0;   /* St::AtMbar: the index of the mbarrier waited on */
    uint64_t wg_committed;   /* wgmma groups committed so far = the id of the open group */
    struct WgPend {
        uint32_t op;
        uint64_t group;
    };
    std::vector<WgPend> wg_pend; /* issued wgmma not yet retired, in issue order */
};

/* An mbarrier's state (the uint64_t in shared memory holds only a reference to it, see
 * mbar_encode). Phase `phase` is in progress; it completes when `pending` arrivals and the tx-count
 * are both 0. TMA copies counted on it wait in `copies` until the phase would otherwise complete
 * (all arrivals made) and a thread observes it (mbar_resolve). */
struct TmaCopy {
    uint8_t* dst;
    uint32_t bytes;
    std::vector<uint8_t> data;
};
struct Mbar {
    uint64_t* addr;
    uint32_t count, pending, waiters;
    int64_t tx;
    uint64_t phase;
    std::vector<TmaCopy> copies;
};

/* One warpgroup MMA (issued by 128 threads at once): the A fragments and d pointers captured at
 * issue, each thread's accumulator input (a snapshot of d, or the output of the earlier wgmma of
 * the same thread on the same d: `chain`), and after `computed` each thread's result, in `buf`. */
struct WgOp {
    uint32_t n = 0;
    uint64_t desc = 0;
    bool acc = false, computed = false;
    uint32_t refs = 0; /* threads that have not retired it, plus later ops chained on it */
    uint32_t a[128][4];
    float* dptr[128];
    int32_t chain[128];
    std::vector<uint32_t> deps; /* ops this one chains on (refs held) */
    std::vector<float> buf;     /* [128][n / 2] */
};

struct Launch {
    const char* name;
    Invoke invoke;
    void* fn;
    const void* args;
    size_t args_size = 0;
    QvDim3 grid, block;
    uint32_t dyn_smem;
    uint64_t total;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    int active = 0; /* pool threads working on it (guarded by the pool mutex) */
    std::condition_variable idle;
    std::mutex mu; /* status and counters */
    QvStatus status{};
    QvCounters ctr{};
};

struct Executor {
    pid_t tid = 0;
    int slot_index = -1;
    /* fibers and their stacks */
    std::vector<Fiber*> fibers;
    std::vector<std::pair<void*, size_t>> maps;
#ifdef QV_USE_UCONTEXT
    ucontext_t sched_uc;
#else
    void* sched_sp = nullptr;
#endif
    Fiber* current = nullptr;
    /* the scheduler's current pass: warps in a fixed order, each run until none of its lanes can */
    uint64_t pass_epoch = 0;
    uint32_t pass_warp = 0, pass_lane = 0, pass_shift = 0;
    bool pass_reverse = false, pass_progress = false, sweep_ran = false;
    /* the CTA being run */
    Launch* L = nullptr;
    dim3 cta, bdim, gdim;
    uint64_t cta_linear = 0;
    uint32_t T = 0, nwarps = 0;
    uint32_t bar_arrived = 0, exited = 0, done = 0;
    uint64_t epoch = 0;
    Warp* warps = nullptr;
    uint8_t* dyn = nullptr;
    size_t dyn_cap = 0;
    uint32_t dyn_size = 0;
    /* sm_90a: mbarriers of this CTA, warpgroup collectives, wgmma operations */
    uint64_t cta_gen = 0;
    std::vector<Mbar> mbars;
    struct WgState {
        uint32_t warps; /* warps of the group waiting at a wgmma (bits 0-3) */
        uint32_t n;
    } wgs[kMaxThreads / 128];
    std::vector<WgOp*> wg_ops, wg_free;
    std::vector<uintptr_t> smem_windows; /* 256 KiB windows named by wgmma descriptors */
    /* the CTA's outcome */
    int err = QV_OK;
    bool err_thread_known = false;
    dim3 err_thread;
    uint64_t err_addr = 0;
    char err_msg[480];
    QvCounters ctr{};
    MemCheck* mc = nullptr; /* this host thread's memory checker (vgpu_memcheck.inc) */
    /* signals */
    sigjmp_buf jb;
    volatile sig_atomic_t in_cta = 0;
    volatile int fault_sig = 0;
    volatile int fault_code = 0;
    void* volatile fault_addr = nullptr;
    void* altstack = nullptr;

    Executor();
    ~Executor();
    void ensure_fibers(uint32_t n);
    void work(Launch& l);
    void run_cta(uint64_t linear);
    void schedule();
    Fiber* next_in_pass();
    void suspend(Fiber* f);
    void set_error(int code, const Fiber* f, const char* fmt, ...) __attribute__((format(printf, 4, 5)));
    [[noreturn]] void fail(int code, Fiber* f, const char* fmt, ...) __attribute__((format(printf, 4, 5)));
    void release_barrier();
    bool warp_arrive(Fiber* f, Op op, uint32_t variant, uint32_t mask);
    void warp_done(Warp& w, Fiber* self);
    void describe_deadlock();
    Mbar& mbar_of(Fiber* f, uint64_t* bar, const char* what);
    void mbar_resolve(Fiber* f, uint32_t idx);
    void mbar_arrive(Fiber* f, uint64_t* bar, uint32_t tx, bool expect_tx);
    void wg_issue(Fiber* f, uint32_t wg);
    void wg_compute(Fiber* f, uint32_t idx);
    void wg_retire(Fiber* f, uint64_t below);
    void wg_release(uint32_t idx);
    void fault_to_error();
};

/* ---- context switch ----------------------------------------------------------------------------- */

#ifndef QV_USE_UCONTEXT
/* qv_ctx_swap(save, next): pushes the callee-saved registers, stores rsp in *save, loads next as
 * rsp, pops that fiber's registers and returns into it. A new fiber's stack is prepared so that
 * the first swap "returns" into qv_fiber_entry with its Fiber* in rbx. */
asm(R"(
    .pushsection .text
    .p2align 4
    .globl qv_ctx_swap
    .hidden qv_ctx_swap
    .type qv_ctx_swap,@function
qv_ctx_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size qv_ctx_swap, .-qv_ctx_swap

    .p2align 4
    .globl qv_fiber_entry
    .hidden qv_fiber_entry
    .type qv_fiber_entry,@function
qv_fiber_entry:
    .cfi_startproc
    .cfi_undefined rip
    movq %rbx, %rdi
    andq $-16, %rsp
    call qv_fiber_main
    ud2
    .cfi_endproc
    .size qv_fiber_entry, .-qv_fiber_entry
    .popsection
)");
#endif

void ctx_init(Fiber* f) {
#ifdef QV_USE_UCONTEXT
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->region + kGuard;
    f->uc.uc_stack.ss_size = (uint8_t*)f->hdr - (f->region + kGuard);
    f->uc.uc_link = nullptr;
    /* The pointer travels as makecontext's int argument: glibc on 64-bit targets passes it whole. */
    makecontext(&f->uc, (void (*)())qv_fiber_main, 1, f);
#else
    /* Top of the usable stack, 16-byte aligned, just below the header. The frame popped by the first
     * qv_ctx_swap: r15 r14 r13 r12 rbx rbp, then the return address. */
    uintptr_t top = (uintptr_t)f->hdr & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(top - 72);
    sp[0] = sp[1] = sp[2] = sp[3] = 0;
    sp[4] = (uint64_t)(uintptr_t)f; /* rbx */
    sp[5] = 0;                      /* rbp */
    sp[6] = (uint64_t)(uintptr_t)&qv_fiber_entry;
    f->sp = sp;
#endif
}

/* The next fiber to run in the current pass, or null when the pass is over (or the CTA failed).
 * A pass takes the warps one at a time in its order and runs each until none of its lanes can run
 * (all wait at __syncthreads, have exited, or wait at a collective for a lane that cannot come):
 * its lanes are swept in order, each running to its next collective, the sweeps repeating while
 * any lane ran. A barrier that completes ends the pass, so the next barrier interval starts with a
 * fresh order. */
Fiber* Executor::next_in_pass() {
    if (err != QV_OK || epoch != pass_epoch) return nullptr;
    while (pass_warp < nwarps) {
        uint32_t w = (pass_reverse ? nwarps - 1 - pass_warp : pass_warp) + pass_shift;
        if (w >= nwarps) w -= nwarps;
        const uint32_t base = 32 * w, n = std::min<uint32_t>(32, T - base);
        while (pass_lane < n) {
            const uint32_t i = pass_lane++;
            Fiber* f = fibers[base + (pass_reverse ? n - 1 - i : i)];
            if (f->state == St::Runnable) {
                pass_progress = sweep_ran = true;
                return f;
            }
        }
        pass_lane = 0;
        if (sweep_ran) {
            sweep_ran = false; /* sweep the warp again */
            continue;
        }
        ++pass_warp;
    }
    return nullptr;
}

/* A fiber that blocks (or ends) hands the host thread straight to the next runnable fiber of the
 * pass, or back to the scheduler at the end of the pass. */
void Executor::suspend(Fiber* f) {
    Fiber* n = next_in_pass();
    current = n;
#ifdef QV_USE_UCONTEXT
    swapcontext(&f->uc, n ? &n->uc : &sched_uc);
#else
    qv_ctx_swap(&f->sp, n ? n->sp : sched_sp);
#endif
}

inline Fiber* self() { return hdr()->fiber; }

/* Adds every counter of c into into. */
void add_counters(QvCounters& into, const QvCounters& c) {
    into.mma += c.mma;
    into.ldmatrix += c.ldmatrix;
    into.ldmatrix_wavefronts += c.ldmatrix_wavefronts;
    into.cp_async += c.cp_async;
    into.cp_async_bytes += c.cp_async_bytes;
    into.shfl += c.shfl;
    into.bar_sync += c.bar_sync;
    into.ctas += c.ctas;
    into.global_ld_bytes += c.global_ld_bytes;
    into.global_st_bytes += c.global_st_bytes;
    into.global_ld_requests += c.global_ld_requests;
    into.global_st_requests += c.global_st_requests;
    into.global_ld_sectors += c.global_ld_sectors;
    into.global_st_sectors += c.global_st_sectors;
    into.shared_ld_bytes += c.shared_ld_bytes;
    into.shared_st_bytes += c.shared_st_bytes;
    into.shared_requests += c.shared_requests;
    into.shared_wavefronts += c.shared_wavefronts;
    into.shared_ideal_wavefronts += c.shared_ideal_wavefronts;
    into.local_bytes += c.local_bytes;
    into.param_bytes += c.param_bytes;
    into.ungrouped_accesses += c.ungrouped_accesses;
}

}  // namespace qv

#include "vgpu_memcheck.inc"

namespace qv {

/* ---- signals ------------------------------------------------------------------------------------ */

struct SigSlot {
    std::atomic<pid_t> tid{0};
    std::atomic<Executor*> ex{nullptr};
};
constexpr int kSlots = 1024;
SigSlot g_slots[kSlots];
constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
struct sigaction g_old[sizeof(kSignals) / sizeof(kSignals[0])];

void chain(int sig, siginfo_t* si, void* uc) {
    for (size_t i = 0; i < sizeof(kSignals) / sizeof(kSignals[0]); ++i) {
        if (kSignals[i] != sig) continue;
        struct sigaction& old = g_old[i];
        if (old.sa_flags & SA_SIGINFO) {
            if (old.sa_sigaction) old.sa_sigaction(sig, si, uc);
            return;
        }
        if (old.sa_handler == SIG_IGN) return;
        if (old.sa_handler == SIG_DFL) {
            /* Back to the default action: a fault re-executes and terminates; a raised signal is
             * raised again (it is blocked until this handler returns). */
            sigaction(sig, &old, nullptr);
            if (si->si_code <= 0 && sig != SIGABRT) raise(sig);
            return;
        }
        old.sa_handler(sig);
        return;
    }
}

void on_signal(int sig, siginfo_t* si, void* uc) {
    const pid_t tid = (pid_t)syscall(SYS_gettid);
    for (int i = 0; i < kSlots; ++i) {
        if (g_slots[i].tid.load(std::memory_order_relaxed) != tid) continue;
        Executor* ex = g_slots[i].ex.load(std::memory_order_relaxed);
        if (ex && ex->in_cta) {
            ex->in_cta = 0;
            ex->fault_sig = sig;
            ex->fault_code = si->si_code;
            ex->fault_addr = si->si_addr;
            siglongjmp(ex->jb, 1);
        }
        break;
    }
    chain(sig, si, uc);
}

void install_handlers() {
    static std::once_flag once;
    std::call_once(once, [] {
        for (size_t i = 0; i < sizeof(kSignals) / sizeof(kSignals[0]); ++i) {
            struct sigaction sa;
            memset(&sa, 0, sizeof(sa));
            sa.sa_sigaction = on_signal;
            sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
            sigemptyset(&sa.sa_mask);
            sigaction(kSignals[i], &sa, &g_old[i]);
        }
    });
}

/* ---- executor ----------------------------------------------------------------------------------- */

Executor::Executor() {
    tid = (pid_t)syscall(SYS_gettid);
    warps = new Warp[kMaxThreads / 32];
    for (int i = 0; i < kSlots; ++i) {
        pid_t z = 0;
        if (g_slots[i].tid.load() == 0 && g_slots[i].tid.compare_exchange_strong(z, tid)) {
            g_slots[i].ex.store(this);
            slot_index = i;
            break;
        }
    }
    /* Faults on a fiber's guard page need an alternate signal stack; keep the thread's own if it has
     * one (Rust threads do). */
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && (cur.ss_flags & SS_DISABLE)) {
        const size_t n = 64 * 1024;
        altstack = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (altstack != MAP_FAILED) {
            stack_t ss{};
            ss.ss_sp = altstack;
            ss.ss_size = n;
            sigaltstack(&ss, nullptr);
        } else {
            altstack = nullptr;
        }
    }
}

Executor::~Executor() {
    if (slot_index >= 0) {
        g_slots[slot_index].ex.store(nullptr);
        g_slots[slot_index].tid.store(0);
    }
    if (altstack) {
        stack_t ss{};
        ss.ss_flags = SS_DISABLE;
        sigaltstack(&ss, nullptr);
        munmap(altstack, 64 * 1024);
    }
    for (Fiber* f : fibers) delete f;
    for (WgOp* o : wg_ops) delete o;
    for (WgOp* o : wg_free) delete o;
    for (auto& m : maps) munmap(m.first, m.second);
    delete[] warps;
    delete mc;
    free(dyn);
}

void Executor::ensure_fibers(uint32_t n) {
    if (fibers.size() >= n) return;
    /* Grow geometrically (up to kMaxThreads) so that mixed block sizes map stacks rarely. */
    const uint32_t have = (uint32_t)fibers.size();
    const uint32_t add = std::max<uint32_t>(n - have, std::min<uint32_t>(have, kMaxThreads - have));
    const size_t bytes = (size_t)(add + 1) * kStackSize;
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        fprintf(stderr, "vgpu: cannot map %zu bytes of fiber stacks\n", bytes);
        abort();
    }
    maps.emplace_back(m, bytes);
    uint8_t* base = (uint8_t*)(((uintptr_t)m + kStackSize - 1) & ~(kStackSize - 1));
    for (uint32_t i = 0; i < add; ++i) {
        Fiber* f = new Fiber();
        f->region = base + (size_t)i * kStackSize;
        mprotect(f->region, kGuard, PROT_NONE);
        f->hdr = new (f->region + kStackSize - sizeof(FiberHdr)) FiberHdr();
        f->hdr->fiber = f;
        f->ex = this;
        f->pend.reserve(32);
        fibers.push_back(f);
    }
}

void Executor::set_error(int code, const Fiber* f, const char* fmt, ...) {
    if (err != QV_OK) return;
    err = code;
    err_thread_known = f != nullptr;
    if (f) err_thread = f->hdr->thread_idx;
    int n = snprintf(err_msg, sizeof err_msg, "kernel '%s', CTA (%u,%u,%u)", L->name, cta.x, cta.y, cta.z);
    if (f && n > 0 && (size_t)n < sizeof err_msg)
        n += snprintf(err_msg + n, sizeof err_msg - n, ", thread (%u,%u,%u)", f->hdr->thread_idx.x,
                      f->hdr->thread_idx.y, f->hdr->thread_idx.z);
    if (n > 0 && (size_t)n + 2 < sizeof err_msg) {
        err_msg[n++] = ':';
        err_msg[n++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err_msg + n, sizeof err_msg - n, fmt, ap);
        va_end(ap);
    }
}

void Executor::fail(int code, Fiber* f, const char* fmt, ...) {
    if (err == QV_OK) {
        char buf[400];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        set_error(code, f, "%s", buf);
    }
    suspend(f); /* never resumed: the scheduler abandons the CTA */
    __builtin_unreachable();
}

void Executor::release_barrier() {
    for (uint32_t t = 0; t < T; ++t)
        if (fibers[t]->state == St::AtBarrier) fibers[t]->state = St::Runnable;
    bar_arrived = 0;
    ++epoch;
    ++ctr.bar_sync;
    mc_converged();
}

/* Records lane f's arrival at a warp collective; true when it is the last lane the collective names
 * (the caller then performs it and calls warp_done). */
bool Executor::warp_arrive(Fiber* f, Op op, uint32_t variant, uint32_t mask) {
    Warp& w = warps[f->warp];
    const uint32_t bit = 1u << f->lane;
    mask &= w.exists;
    if (!(mask & bit))
        fail(QV_PTX_ERROR, f, "%s with member mask 0x%08x that does not name the executing lane %u", op_name(op, variant),
             mask, f->lane);
    if (w.arrived == 0) {
        w.op = op;
        w.variant = variant;
        w.mask = mask;
    } else if (w.op != op || w.variant != variant || w.mask != mask) {
        fail(QV_PTX_ERROR, f,
             "lanes of warp %u disagree: lane %u executes %s (mask 0x%08x) while lanes 0x%08x wait at %s (mask 0x%08x)",
             f->warp, f->lane, op_name(op, variant), mask, w.arrived, op_name(w.op, w.variant), w.mask);
    }
    if (mask & w.exited)
        fail(QV_BARRIER_DEADLOCK, f, "%s in warp %u names lanes 0x%08x that have exited; %d of %d lanes arrived",
             op_name(op, variant), f->warp, mask & w.exited, __builtin_popcount(w.arrived | bit), __builtin_popcount(mask));
    w.arrived |= bit;
    if (w.arrived == w.mask && w.mask == (w.exists & ~w.exited)) mc_converged();
    return w.arrived == w.mask;
}

void Executor::warp_done(Warp& w, Fiber* me) {
    const uint32_t base = me->warp * 32;
    uint32_t m = w.mask & ~(1u << me->lane);
    while (m) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        fibers[base + l]->state = St::Runnable;
    }
    w.arrived = 0;
    w.op = Op::None;
}

void Executor::describe_deadlock() {
    char buf[400];
    int n = snprintf(buf, sizeof buf, "no thread can run: %u of %u threads wait at __syncthreads, %u exited", bar_arrived, T,
                     exited);
    const Fiber* who = nullptr;
    for (uint32_t w = 0; w < nwarps && n > 0 && (size_t)n < sizeof buf; ++w) {
        if (!warps[w].arrived) continue;
        n += snprintf(buf + n, sizeof buf - n, "; warp %u: %d of %d lanes wait at %s", w, __builtin_popcount(warps[w].arrived),
                      __builtin_popcount(warps[w].mask), op_name(warps[w].op, warps[w].variant));
        if (warps[w].op == Op::Wgmma && warps[w].arrived == warps[w].mask && n > 0 && (size_t)n < sizeof buf)
            n += snprintf(buf + n, sizeof buf - n, " (a warpgroup collective: %d of the 4 warps of warpgroup %u arrived)",
                          __builtin_popcount(wgs[w / 4].warps), w / 4);
        if (!who) {
            const uint32_t missing = warps[w].mask & ~warps[w].arrived;
            if (missing) who = fibers[w * 32 + __builtin_ctz(missing)];
        }
    }
    uint32_t at_mbar = 0;
    const Fiber* mwho = nullptr;
    for (uint32_t t = 0; t < T; ++t)
        if (fibers[t]->state == St::AtMbar) {
            ++at_mbar;
            /* Name a barrier whose arrivals are done (waiting for bytes) if there is one. */
            const Mbar& b = mbars[fibers[t]->wait_bar];
            if (!mwho || (b.pending == 0 && mbars[mwho->wait_bar].pending != 0)) mwho = fibers[t];
        }
    if (mwho && n > 0 && (size_t)n < sizeof buf) {
        const Mbar& b = mbars[mwho->wait_bar];
        n += snprintf(buf + n, sizeof buf - n,
                      "; %u threads wait on mbarriers (mbarrier.try_wait), e.g. thread %u on the mbarrier at %p: phase %llu "
                      "never completes (%u of %u arrivals pending, tx-count %lld, %zu TMA copies not landed)",
                      at_mbar, mwho->linear, (void*)b.addr, (unsigned long long)b.phase, b.pending, b.count, (long long)b.tx,
                      b.copies.size());
        if (!who) who = mwho;
    }
    if (!who)
        for (uint32_t t = 0; t < T && !who; ++t)
            if (fibers[t]->state == St::AtWarp) who = fibers[t];
    set_error(QV_BARRIER_DEADLOCK, who, "%s", buf);
}

void Executor::fault_to_error() {
    const uintptr_t a = (uintptr_t)fault_addr;
    const Fiber* f = current;
    current = nullptr;
    const char* sig = fault_sig == SIGSEGV ? "SIGSEGV"
                      : fault_sig == SIGBUS ? "SIGBUS"
                      : fault_sig == SIGFPE ? "SIGFPE"
                      : fault_sig == SIGILL ? "SIGILL"
                                            : "SIGABRT";
    if (fault_sig == SIGSEGV || fault_sig == SIGBUS) {
        bool stack = false;
        for (const Fiber* g : fibers)
            if (a >= (uintptr_t)g->region && a < (uintptr_t)g->region + kGuard) stack = true;
        if (stack)
            set_error(QV_MEMORY_FAULT, f, "stack overflow of an emulated thread (%s at 0x%llx; fiber stacks are %u KiB)", sig,
                      (unsigned long long)a, (unsigned)(kStackSize / 1024));
        else if (fault_code == SI_KERNEL)
            set_error(QV_MEMORY_FAULT, f,
                      "%s: general protection fault (a misaligned 16-byte vector access or a non-canonical address)", sig);
        else
            set_error(QV_MEMORY_FAULT, f, "invalid memory access at 0x%llx (%s)", (unsigned long long)a, sig);
        err_addr = a;
    } else if (fault_sig == SIGABRT) {
        set_error(QV_TRAP, f, "abort() (%s; a host assert() in device code?)", sig);
    } else {
        set_error(QV_TRAP, f, "%s at 0x%llx (%s)", fault_sig == SIGFPE ? "arithmetic exception (integer division by zero?)"
                                                                      : "illegal instruction",
                  (unsigned long long)a, sig);
    }
}

void Executor::run_cta(uint64_t linear) {
    const Launch& l = *L;
    cta_linear = linear;
    cta.x = (unsigned)(linear % l.grid.x);
    cta.y = (unsigned)((linear / l.grid.x) % l.grid.y);
    cta.z = (unsigned)(linear / ((uint64_t)l.grid.x * l.grid.y));
    for (uint32_t t = 0; t < T; ++t) {
        Fiber* f = fibers[t];
        f->linear = t;
        f->warp = t / 32;
        f->lane = t % 32;
        f->state = St::Runnable;
        f->committed = 0;
        f->pend.clear();
        f->wg_committed = 0;
        f->wg_pend.clear();
        FiberHdr* h = f->hdr;
        h->thread_idx = dim3{t % bdim.x, (t / bdim.x) % bdim.y, t / (bdim.x * bdim.y)};
        h->block_idx = cta;
        h->block_dim = bdim;
        h->grid_dim = gdim;
        ctx_init(f);
    }
    for (uint32_t w = 0; w < nwarps; ++w) {
        const uint32_t n = std::min<uint32_t>(32, T - 32 * w);
        warps[w].exists = n == 32 ? 0xffffffffu : ((1u << n) - 1);
        warps[w].exited = warps[w].arrived = warps[w].mask = 0;
        warps[w].op = Op::None;
    }
    bar_arrived = exited = done = 0;
    epoch = 0;
    ++cta_gen;
    mbars.clear();
    for (WgOp* o : wg_ops)
        if (o) wg_free.push_back(o);
    wg_ops.clear();
    for (auto& g : wgs) g.warps = g.n = 0;
    err = QV_OK;
    err_addr = 0;
    if (dyn_size) memset(dyn, kPoison, dyn_size);
    ++ctr.ctas;
    mc_cta_begin(this, l.args, l.args_size);
    if (sigsetjmp(jb, 1)) {
        fault_to_error();
        mc_cta_end(this);
        return;
    }
    in_cta = 1;
    schedule();
    in_cta = 0;
    mc_cta_end(this);
}

void Executor::schedule() {
    for (;;) {
        /* The order of a pass: warps ascending or descending (alternating with the barrier epoch and
         * the CTA), rotated by a number of warps that also changes with both; lanes in the same
         * direction. */
        pass_epoch = epoch;
        pass_reverse = ((cta_linear + epoch) & 1) != 0;
        pass_shift = (uint32_t)((cta_linear * 5 + epoch * 3) % nwarps);
        pass_warp = pass_lane = 0;
        pass_progress = sweep_ran = false;
        if (Fiber* f = next_in_pass()) {
            current = f;
#ifdef QV_USE_UCONTEXT
            swapcontext(&sched_uc, &f->uc);
#else
            qv_ctx_swap(&sched_sp, f->sp);
#endif
            current = nullptr;
        }
        if (err != QV_OK || done == T) return;
        if (!pass_progress) {
            describe_deadlock();
            return;
        }
    }
}

void Executor::work(Launch& l) {
    L = &l;
    bdim = dim3{l.block.x, l.block.y, l.block.z};
    gdim = dim3{l.grid.x, l.grid.y, l.grid.z};
    T = l.block.x * l.block.y * l.block.z;
    nwarps = (T + 31) / 32;
    ensure_fibers(T);
    dyn_size = l.dyn_smem;
    if (dyn_size > dyn_cap) {
        free(dyn);
        dyn_cap = (dyn_size + 1023) & ~(size_t)1023;
        dyn = (uint8_t*)aligned_alloc(1024, dyn_cap);
    }
    ctr = QvCounters{};
    while (!l.failed.load(std::memory_order_relaxed)) {
        const uint64_t i = l.next.fetch_add(1, std::memory_order_relaxed);
        if (i >= l.total) break;
        run_cta(i);
        if (err != QV_OK) {
            std::lock_guard<std::mutex> g(l.mu);
            if (!l.failed.exchange(true)) {
                QvStatus& s = l.status;
                s.code = err;
                s.fault_addr = err_addr;
                s.cta = QvDim3{cta.x, cta.y, cta.z};
                s.thread = err_thread_known ? QvDim3{err_thread.x, err_thread.y, err_thread.z} : QvDim3{0, 0, 0};
                snprintf(s.message, sizeof s.message, "vgpu: %s", err_msg);
            }
            break;
        }
    }
    std::lock_guard<std::mutex> g(l.mu);
    add_counters(l.ctr, ctr);
    L = nullptr;
}

/* ---- the pool ----------------------------------------------------------------------------------- */

struct Pool {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Launch*> q;
    std::vector<std::thread> threads;
    unsigned helpers = 0; /* pool threads allowed to take work */

    static unsigned default_workers() {
        if (const char* e = getenv("QV_WORKERS")) {
            const long v = strtol(e, nullptr, 10);
            if (v >= 1) return (unsigned)v;
        }
        const unsigned n = std::thread::hardware_concurrency();
        return n ? n : 1;
    }
    Pool() { helpers = default_workers() - 1; }

    void loop(unsigned index) {
        Executor ex;
        std::unique_lock<std::mutex> lk(mu);
        for (;;) {
            Launch* l = nullptr;
            if (index < helpers)
                for (Launch* x : q)
                    if (!x->failed.load(std::memory_order_relaxed) && x->next.load(std::memory_order_relaxed) < x->total) {
                        l = x;
                        break;
                    }
            if (!l) {
                cv.wait(lk);
                continue;
            }
            ++l->active;
            lk.unlock();
            ex.work(*l);
            lk.lock();
            if (--l->active == 0) l->idle.notify_all();
        }
    }
    /* Called with mu held. */
    void spawn(unsigned n) {
        while (threads.size() < n) {
            const unsigned i = (unsigned)threads.size();
            threads.emplace_back([this, i] { loop(i); });
            threads.back().detach();
        }
    }
};

Pool& pool() {
    static Pool* p = new Pool(); /* never destroyed: detached threads wait on it at exit */
    return *p;
}

Executor& caller_executor() {
    thread_local std::unique_ptr<Executor> ex;
    if (!ex) ex.reset(new Executor());
    return *ex;
}

/* ---- registry ----------------------------------------------------------------------------------- */

KernelReg* g_regs = nullptr;

const std::vector<const KernelReg*>& kernels() {
    static const std::vector<const KernelReg*> v = [] {
        std::vector<const KernelReg*> out;
        for (const KernelReg* r = g_regs; r; r = r->next) {
            bool dup = false;
            for (const KernelReg* o : out) dup |= strcmp(o->name, r->name) == 0;
            if (!dup) out.push_back(r);
        }
        std::sort(out.begin(), out.end(), [](const KernelReg* a, const KernelReg* b) { return strcmp(a->name, b->name) < 0; });
        return out;
    }();
    return v;
}

const KernelReg* find_kernel(const char* name) {
    for (const KernelReg* r : kernels())
        if (strcmp(r->name, name) == 0) return r;
    return nullptr;
}

void set_status(QvStatus* st, int code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
void set_status(QvStatus* st, int code, const char* fmt, ...) {
    if (!st) return;
    memset(st, 0, sizeof *st);
    st->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->message, sizeof st->message, fmt, ap);
    va_end(ap);
}

/* ---- helpers for the instructions --------------------------------------------------------------- */

inline float f16_to_f32(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        const float v = (float)m * 0x1p-24f; /* exact: m < 2^10 */
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}

/* Shared-memory wavefronts of one 8x8 ldmatrix phase. Shared memory has 32 banks of 4 bytes; a
 * 16-byte aligned row occupies the 4 banks of group (address / 16) % 8 and one wavefront serves one
 * distinct row per group (lanes naming the same row share it: a broadcast). So the phase takes as
 * many wavefronts as the largest number of distinct rows falling in one bank group: 1 when the 8
 * rows hit 8 different groups (a conflict-free swizzle), up to 8 when they all share one. */
uint32_t count_wavefronts(const uintptr_t (&row)[8]) {
    uint32_t worst = 1;
    for (int g = 0; g < 8; ++g) {
        uintptr_t seen[8];
        uint32_t n = 0;
        for (int r = 0; r < 8; ++r) {
            if (((row[r] >> 4) & 7) != (uintptr_t)g) continue;
            bool dup = false;
            for (uint32_t k = 0; k < n; ++k) dup |= seen[k] == row[r];
            if (!dup) seen[n++] = row[r];
        }
        worst = std::max(worst, n);
    }
    return worst;
}

void complete_cp(Fiber* f, uint64_t below) {
    size_t k = 0;
    for (size_t i = 0; i < f->pend.size(); ++i) {
        Pending& p = f->pend[i];
        if (p.group < below) memcpy(p.dst, p.data, p.size);
        else f->pend[k++] = p;
    }
    f->pend.resize(k);
}

/* ---- fiber entry and exit ------------------------------------------------------------------------ */

}  // namespace qv

extern "C" void qv_fiber_main(qv::Fiber* f) {
    using namespace qv;
    Executor* ex = f->ex;
    ex->L->invoke(ex->L->fn, ex->L->args);
    /* The thread ends: its outstanding copies still land (the hardware completes them). */
    complete_cp(f, ~0ull);
    f->state = St::Done;
    ++ex->done;
    ++ex->exited;
    Warp& w = ex->warps[f->warp];
    w.exited |= 1u << f->lane;
    if (w.arrived && (w.mask & (1u << f->lane)))
        ex->fail(QV_BARRIER_DEADLOCK, f, "exited while lanes 0x%08x of warp %u wait for it at %s", w.arrived, f->warp,
                 op_name(w.op, w.variant));
    if (ex->bar_arrived && ex->bar_arrived + ex->exited == ex->T)
        ex->fail(QV_BARRIER_DEADLOCK, f,
                 "__syncthreads reached by %u of %u threads; the other %u exited (every thread of the CTA must reach it)",
                 ex->bar_arrived, ex->T, ex->exited);
    if (f->warp / 4 < kMaxThreads / 128 && ex->wgs[f->warp / 4].warps)
        ex->fail(QV_BARRIER_DEADLOCK, f, "exited while warps 0x%x of warpgroup %u wait for it at %s", ex->wgs[f->warp / 4].warps,
                 f->warp / 4, op_name(Op::Wgmma, ex->wgs[f->warp / 4].n));
    /* wgmma still in flight: their results would land in registers of a thread that has ended. */
    for (const Fiber::WgPend& p : f->wg_pend) ex->wg_release(p.op);
    f->wg_pend.clear();
    ex->suspend(f);
    __builtin_unreachable();
}

namespace qv {

KernelReg::KernelReg(const char* name_, size_t args_size_, Invoke invoke_, void* fn_)
    : name(name_), args_size(args_size_), invoke(invoke_), fn(fn_), next(nullptr) {
    if (!fn) return; /* declared, but not linked into this program */
    next = g_regs;
    g_regs = this;
}

/* ---- device-side entry points (cuda_emu.h) ------------------------------------------------------- */

void syncthreads() {
    Fiber* f = self();
    Executor* ex = f->ex;
    if (++ex->bar_arrived == ex->T) {
        /* The last thread releases the barrier and yields: the next barrier interval starts a new
         * pass in its own order. */
        ex->release_barrier();
        f->state = St::Runnable;
        ex->suspend(f);
        return;
    }
    if (ex->bar_arrived + ex->exited == ex->T)
        ex->fail(QV_BARRIER_DEADLOCK, f,
                 "__syncthreads reached by %u of %u threads; the other %u exited (every thread of the CTA must reach it)",
                 ex->bar_arrived, ex->T, ex->exited);
    f->state = St::AtBarrier;
    ex->suspend(f);
}

uint64_t shfl(unsigned mask, uint64_t v, int mode, int b, int c, int words) {
    Fiber* f = self();
    Executor* ex = f->ex;
    Warp& w = ex->warps[f->warp];
    LaneSlot& s = w.slot[f->lane];
    s.in = v;
    /* PTX shfl.sync: segment mask c[12:8], clamp c[4:0], lane operand b[4:0]. */
    const int lane = (int)f->lane, bval = b & 31, cval = c & 31, seg = (c >> 8) & 31;
    const int max_lane = (lane & seg) | (cval & ~seg), min_lane = lane & seg;
    int j;
    bool ok;
    switch (mode) {
        case 0: j = min_lane | (bval & ~seg); ok = j <= max_lane; break;
        case 1: j = lane - bval; ok = j >= max_lane; break;
        case 2: j = lane + bval; ok = j <= max_lane; break;
        default: j = lane ^ bval; ok = j <= max_lane; break;
    }
    s.src = ok ? j : lane;
    if (ex->warp_arrive(f, Op::Shfl, 0, mask)) {
        uint32_t m = w.mask;
        while (m) {
            const int l = __builtin_ctz(m);
            m &= m - 1;
            const int src = w.slot[l].src;
            /* A source lane outside the mask has no defined value: the lane keeps its own. */
            w.slot[l].out = (w.mask >> src) & 1 ? w.slot[src].in : w.slot[l].in;
        }
        ex->ctr.shfl += words;
        ex->warp_done(w, f);
    } else {
        f->state = St::AtWarp;
        ex->suspend(f);
    }
    return s.out;
}

void syncwarp(unsigned mask) {
    Fiber* f = self();
    Executor* ex = f->ex;
    if (ex->warp_arrive(f, Op::SyncWarp, 0, mask)) {
        ex->warp_done(ex->warps[f->warp], f);
    } else {
        f->state = St::AtWarp;
        ex->suspend(f);
    }
}

unsigned ballot(unsigned mask, int pred) {
    Fiber* f = self();
    Executor* ex = f->ex;
    Warp& w = ex->warps[f->warp];
    LaneSlot& s = w.slot[f->lane];
    s.in = pred != 0;
    if (ex->warp_arrive(f, Op::Ballot, 0, mask)) {
        uint32_t r = 0, m = w.mask;
        while (m) {
            const int l = __builtin_ctz(m);
            m &= m - 1;
            if (w.slot[l].in) r |= 1u << l;
        }
        m = w.mask;
        while (m) {
            const int l = __builtin_ctz(m);
            m &= m - 1;
            w.slot[l].out = r;
        }
        ex->warp_done(w, f);
    } else {
        f->state = St::AtWarp;
        ex->suspend(f);
    }
    return (unsigned)s.out;
}

unsigned activemask() {
    Fiber* f = self();
    const Warp& w = f->ex->warps[f->warp];
    return w.exists & ~w.exited;
}

void trap(const char* what) {
    Fiber* f = self();
    f->ex->fail(QV_TRAP, f, "%s", what);
}

void device_assert(const char* expr, const char* file, int line) {
    Fiber* f = self();
    f->ex->fail(QV_TRAP, f, "device assertion '%s' failed at %s:%d", expr, file, line);
}

void* dynamic_smem() { return self()->ex->dyn; }
uint32_t dynamic_smem_size() { return self()->ex->dyn_size; }

void cp_async(void* dst, const void* src, uint32_t cp_size, uint32_t src_size, bool cg) {
    Fiber* f = self();
    Executor* ex = f->ex;
    if (cp_size != 4 && cp_size != 8 && cp_size != 16)
        ex->fail(QV_PTX_ERROR, f, "cp.async of %u bytes (4, 8 or 16)", cp_size);
    if (cg && cp_size != 16) ex->fail(QV_PTX_ERROR, f, "cp.async.cg of %u bytes (only 16)", cp_size);
    if (src_size > cp_size) ex->fail(QV_PTX_ERROR, f, "cp.async src-size %u larger than cp-size %u", src_size, cp_size);
    if (((uintptr_t)dst | (uintptr_t)src) & (cp_size - 1))
        ex->fail(QV_PTX_ERROR, f, "cp.async of %u bytes from %p to %p: addresses must be %u-byte aligned", cp_size, src, dst,
                 cp_size);
    if (mc_space_of(ex, dst) != McSpace::Shared)
        ex->fail(QV_PTX_ERROR, f, "cp.async destination %p is not shared memory", dst);
    if (src_size && mc_space_of(ex, src) != McSpace::Global)
        ex->fail(QV_PTX_ERROR, f, "cp.async source %p is not global memory", src);
    const uintptr_t pc = (uintptr_t)__builtin_return_address(0);
    mc_runtime_access(src, src_size, false, pc);
    mc_runtime_access(dst, cp_size, true, pc + 1);
    f->pend.emplace_back();
    Pending& p = f->pend.back();
    p.dst = (uint8_t*)dst;
    p.size = cp_size;
    p.group = f->committed;
    memcpy(p.data, src, src_size);
    memset(p.data + src_size, 0, cp_size - src_size);
    memset(dst, kPoison, cp_size); /* undefined until the group completes */
    ++ex->ctr.cp_async;
    ex->ctr.cp_async_bytes += src_size;
}

void cp_async_commit() { ++self()->committed; }

void cp_async_wait(int n) {
    Fiber* f = self();
    if (f->committed > (uint64_t)n) complete_cp(f, f->committed - (uint64_t)n);
}

void cp_async_wait_all() {
    Fiber* f = self();
    ++f->committed;
    complete_cp(f, f->committed);
}

void ldmatrix(uint32_t* r, int n, bool trans, const void* p) {
    Fiber* f = self();
    Executor* ex = f->ex;
    Warp& w = ex->warps[f->warp];
    const uint32_t variant = (uint32_t)n * 2 + (trans ? 1 : 0);
    if (w.exists != 0xffffffffu)
        ex->fail(QV_PTX_ERROR, f, "%s in a warp of %d threads (needs all 32)", op_name(Op::Ldmatrix, variant),
                 __builtin_popcount(w.exists));
    LaneSlot& s = w.slot[f->lane];
    s.addr = p;
    s.regs = r;
    if (!ex->warp_arrive(f, Op::Ldmatrix, variant, 0xffffffffu)) {
        f->state = St::AtWarp;
        ex->suspend(f);
        return;
    }
    uint16_t m[4][8][8];
    uint64_t wfs = 0;
    for (int i = 0; i < n; ++i) {
        uintptr_t rows[8];
        for (int rr = 0; rr < 8; ++rr) {
            const int lane = 8 * i + rr;
            rows[rr] = (uintptr_t)w.slot[lane].addr;
            if (rows[rr] & 15) {
                ex->set_error(QV_PTX_ERROR, ex->fibers[f->warp * 32 + lane],
                              "%s: row address %p of matrix %d (lane %d) is not 16-byte aligned",
                              op_name(Op::Ldmatrix, variant), w.slot[lane].addr, i, lane);
                ex->fail(QV_PTX_ERROR, f, "-");
            }
            if (mc_space_of(ex, w.slot[lane].addr) != McSpace::Shared) {
                ex->set_error(QV_PTX_ERROR, ex->fibers[f->warp * 32 + lane],
                              "%s: row address %p of matrix %d (lane %d) is not shared memory",
                              op_name(Op::Ldmatrix, variant), w.slot[lane].addr, i, lane);
                ex->fail(QV_PTX_ERROR, f, "-");
            }
            memcpy(m[i][rr], w.slot[lane].addr, 16);
        }
        const uint32_t wf = count_wavefronts(rows);
        ex->ctr.ldmatrix_wavefronts += wf;
        wfs += wf;
    }
    mc_ldmatrix((uint32_t)n, wfs);
    for (int lane = 0; lane < 32; ++lane) {
        const int rr = lane / 4, cc = 2 * (lane % 4);
        for (int i = 0; i < n; ++i) {
            const uint32_t lo = trans ? m[i][cc][rr] : m[i][rr][cc];
            const uint32_t hi = trans ? m[i][cc + 1][rr] : m[i][rr][cc + 1];
            w.slot[lane].regs[i] = lo | (hi << 16);
        }
    }
    ++ex->ctr.ldmatrix;
    ex->warp_done(w, f);
}

void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, const float* c, MmaType t) {
    Fiber* f = self();
    Executor* ex = f->ex;
    Warp& w = ex->warps[f->warp];
    if (w.exists != 0xffffffffu)
        ex->fail(QV_PTX_ERROR, f, "%s in a warp of %d threads (needs all 32)", op_name(Op::Mma, (uint32_t)t),
                 __builtin_popcount(w.exists));
    LaneSlot& s = w.slot[f->lane];
    memcpy(s.a, a, sizeof s.a);
    s.b[0] = b0;
    s.b[1] = b1;
    memcpy(s.c, c, sizeof s.c);
    s.d = d;
    if (!ex->warp_arrive(f, Op::Mma, (uint32_t)t, 0xffffffffu)) {
        f->state = St::AtWarp;
        ex->suspend(f);
        return;
    }
    /* Unpack the fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
     * g = lane / 4, q = lane % 4; each register holds two elements, the lower index in bits 0-15. */
    typedef float v4 __attribute__((vector_size(16)));
    alignas(32) float A[16][16], B[16][8], D[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, q = lane & 3;
        const LaneSlot& x = w.slot[lane];
        const uint32_t regs[6] = {x.a[0], x.a[1], x.a[2], x.a[3], x.b[0], x.b[1]};
        float e[12];
        if (t == MmaType::BF16) {
            for (int k = 0; k < 6; ++k) {
                e[2 * k] = __uint_as_float(regs[k] << 16);
                e[2 * k + 1] = __uint_as_float(regs[k] & 0xffff0000u);
            }
        } else {
            for (int k = 0; k < 6; ++k) {
                e[2 * k] = f16_to_f32(regs[k] & 0xffffu);
                e[2 * k + 1] = f16_to_f32(regs[k] >> 16);
            }
        }
        A[g][2 * q] = e[0], A[g][2 * q + 1] = e[1];             /* a0, a1 */
        A[g + 8][2 * q] = e[2], A[g + 8][2 * q + 1] = e[3];     /* a2, a3 */
        A[g][2 * q + 8] = e[4], A[g][2 * q + 9] = e[5];         /* a4, a5 */
        A[g + 8][2 * q + 8] = e[6], A[g + 8][2 * q + 9] = e[7]; /* a6, a7 */
        B[2 * q][g] = e[8], B[2 * q + 1][g] = e[9];             /* b0, b1 */
        B[2 * q + 8][g] = e[10], B[2 * q + 9][g] = e[11];       /* b2, b3 */
        D[g][2 * q] = x.c[0], D[g][2 * q + 1] = x.c[1];         /* c0, c1 */
        D[g + 8][2 * q] = x.c[2], D[g + 8][2 * q + 1] = x.c[3]; /* c2, c3 */
    }
    /* D[i][j] = ((C[i][j] + A[i][0] B[0][j]) + A[i][1] B[1][j]) + ... : exact products, f32 adds, k
     * ascending (4 columns per vector operation, each element still one multiply and one add). */
    for (int i = 0; i < 16; ++i) {
        v4 d0, d1;
        memcpy(&d0, &D[i][0], 16);
        memcpy(&d1, &D[i][4], 16);
        for (int k = 0; k < 16; ++k) {
            const v4 a = {A[i][k], A[i][k], A[i][k], A[i][k]};
            v4 b0, b1;
            memcpy(&b0, &B[k][0], 16);
            memcpy(&b1, &B[k][4], 16);
            d0 = d0 + a * b0;
            d1 = d1 + a * b1;
        }
        memcpy(&D[i][0], &d0, 16);
        memcpy(&D[i][4], &d1, 16);
    }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, q = lane & 3;
        float* out = w.slot[lane].d;
        out[0] = D[g][2 * q];
        out[1] = D[g][2 * q + 1];
        out[2] = D[g + 8][2 * q];
        out[3] = D[g + 8][2 * q + 1];
    }
    ++ex->ctr.mma;
    ex->warp_done(w, f);
}

/* ---- sm_90a: mbarrier, TMA, wgmma (qadapt_sm90.cuh in this directory) ---------------------------------
 *
 * mbarrier. The uint64_t in shared memory holds a reference into the executor's table of this CTA:
 * bits 48-63 0x4d42 ("MB"), 24-47 the CTA's generation, 0-23 the index; the table entry also
 * records the address, so a word that mbarrier.init did not write in this CTA (poison, a stale
 * barrier of an earlier CTA in static shared memory, a copy) is refused. try_wait blocks the
 * fiber (St::AtMbar) until the phase completes; the completion makes the waiters runnable again
 * (in the scheduler's next pass if their warp's turn has gone: the pass that ran the completing
 * thread made progress, so another pass follows).
 *
 * TMA. At issue the box is read from global memory (checked and counted by the memory checker),
 * zero-filled outside the tensor, swizzled, and kept with the barrier; the destination is filled
 * with 0xff bytes. The copies land (and decrement the tx-count by the box's bytes) at the latest
 * moment the ISA allows: when the phase they count on has received all its arrivals and a thread
 * observes the barrier (try_wait, or is already waiting, or arrives again). So a read of the
 * destination that no completed phase orders sees NaN. */

constexpr uint64_t kMbarTag = 0x4d42;
constexpr uint32_t kMbarMaxCount = (1u << 20) - 1;
constexpr int64_t kTxMax = (1 << 20) - 1;

inline uint64_t mbar_encode(uint64_t gen, uint32_t idx) {
    return (kMbarTag << 48) | ((gen & 0xffffff) << 24) | (idx & 0xffffff);
}

Mbar& Executor::mbar_of(Fiber* f, uint64_t* bar, const char* what) {
    if ((uintptr_t)bar & 7) fail(QV_PTX_ERROR, f, "%s: mbarrier address %p is not 8-byte aligned", what, (void*)bar);
    if (mc_space_of(this, bar) != McSpace::Shared) fail(QV_PTX_ERROR, f, "%s: mbarrier %p is not shared memory", what, (void*)bar);
    const uint64_t v = *bar;
    const uint32_t idx = (uint32_t)(v & 0xffffff);
    if ((v >> 48) != kMbarTag || ((v >> 24) & 0xffffff) != (cta_gen & 0xffffff) || idx >= mbars.size() || mbars[idx].addr != bar)
        fail(QV_PTX_ERROR, f, "%s on the mbarrier at %p, which mbarrier.init did not initialize in this CTA (it holds 0x%016llx)",
             what, (void*)bar, (unsigned long long)v);
    return mbars[idx];
}

/* Phase idx has all its arrivals (pending == 0) and a thread observes it: the TMA copies counted on
 * it land, then it completes if the tx-count is 0. */
void Executor::mbar_resolve(Fiber* f, uint32_t idx) {
    Mbar& b = mbars[idx];
    if (b.pending != 0) return;
    for (TmaCopy& c : b.copies) {
        memcpy(c.dst, c.data.data(), c.bytes);
        b.tx -= c.bytes;
    }
    b.copies.clear();
    if (b.tx < 0)
        fail(QV_PTX_ERROR, f,
             "mbarrier at %p, phase %llu: the TMA copies counted on it wrote %lld bytes more than arrive.expect_tx announced "
             "(tx-count underflow)",
             (void*)b.addr, (unsigned long long)b.phase, (long long)-b.tx);
    if (b.tx != 0) return;
    ++b.phase;
    b.pending = b.count;
    if (b.waiters) {
        for (uint32_t t = 0; t < T; ++t) {
            Fiber* g = fibers[t];
            if (g->state == St::AtMbar && g->wait_bar == idx) g->state = St::Runnable;
        }
        b.waiters = 0;
    }
}

void Executor::mbar_arrive(Fiber* f, uint64_t* bar, uint32_t tx, bool expect_tx) {
    const char* what = expect_tx ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
    Mbar& b = mbar_of(f, bar, what);
    const uint32_t idx = (uint32_t)(&b - mbars.data());
    if (b.pending == 0) {
        /* The current phase has all its arrivals: this one belongs to the next phase, if the
         * current one can complete now. */
        mbar_resolve(f, idx);
        if (b.pending == 0)
            fail(QV_PTX_ERROR, f,
                 "%s on the mbarrier at %p: phase %llu already has its %u arrivals and waits for tx-count %lld (an arrival "
                 "beyond the expected count)",
                 what, (void*)bar, (unsigned long long)b.phase, b.count, (long long)b.tx);
    }
    if (expect_tx) {
        b.tx += tx;
        if (b.tx > kTxMax)
            fail(QV_PTX_ERROR, f, "%s on the mbarrier at %p: tx-count %lld exceeds 2^20 - 1", what, (void*)bar, (long long)b.tx);
    }
    --b.pending;
    if (b.pending == 0 && (b.copies.empty() || b.waiters)) mbar_resolve(f, idx);
}

void mbar_init(uint64_t* bar, uint32_t count) {
    Fiber* f = self();
    Executor* ex = f->ex;
    if ((uintptr_t)bar & 7) ex->fail(QV_PTX_ERROR, f, "mbarrier.init: address %p is not 8-byte aligned", (void*)bar);
    if (mc_space_of(ex, bar) != McSpace::Shared) ex->fail(QV_PTX_ERROR, f, "mbarrier.init: %p is not shared memory", (void*)bar);
    if (count < 1 || count > kMbarMaxCount)
        ex->fail(QV_PTX_ERROR, f, "mbarrier.init with count %u (1 .. 2^20 - 1)", count);
    const uint64_t v = *bar;
    uint32_t idx = (uint32_t)(v & 0xffffff);
    if ((v >> 48) == kMbarTag && ((v >> 24) & 0xffffff) == (ex->cta_gen & 0xffffff) && idx < ex->mbars.size() &&
        ex->mbars[idx].addr == bar) {
        Mbar& b = ex->mbars[idx];
        if (b.waiters || !b.copies.empty())
            ex->fail(QV_PTX_ERROR, f, "mbarrier.init on the mbarrier at %p while %u threads wait on it and %zu TMA copies count on it",
                     (void*)bar, b.waiters, b.copies.size());
    } else {
        if (ex->mbars.size() >= 0xffffff) ex->fail(QV_PTX_ERROR, f, "too many mbarrier.init in one CTA");
        idx = (uint32_t)ex->mbars.size();
        ex->mbars.emplace_back();
    }
    Mbar& b = ex->mbars[idx];
    b.addr = bar;
    b.count = b.pending = count;
    b.waiters = 0;
    b.tx = 0;
    b.phase = 0;
    b.copies.clear();
    *bar = mbar_encode(ex->cta_gen, idx);
}

void mbar_arrive(uint64_t* bar, uint32_t tx, bool expect_tx) {
    Fiber* f = self();
    f->ex->mbar_arrive(f, bar, tx, expect_tx);
}

void mbar_wait(uint64_t* bar, uint32_t parity) {
    Fiber* f = self();
    Executor* ex = f->ex;
    Mbar& b0 = ex->mbar_of(f, bar, "mbarrier.try_wait.parity");
    const uint32_t idx = (uint32_t)(&b0 - ex->mbars.data());
    for (;;) {
        Mbar& b = ex->mbars[idx];
        /* The phase of parity `parity` has completed iff the phase in progress has the other parity. */
        if ((b.phase & 1) != (parity & 1)) return;
        if (b.pending == 0) {
            ex->mbar_resolve(f, idx);
            if ((ex->mbars[idx].phase & 1) != (parity & 1)) return;
        }
        ++ex->mbars[idx].waiters;
        f->wait_bar = idx;
        f->state = St::AtMbar;
        ex->suspend(f);
    }
}

int32_t tmap_check(const QvTensorMap& m, const char** why);

void tma_load_2d(void* dst, const void* map, uint64_t* bar, int32_t c0, int32_t c1) {
    Fiber* f = self();
    Executor* ex = f->ex;
    const char* what = "cp.async.bulk.tensor.2d";
    if ((uintptr_t)map & 63) ex->fail(QV_PTX_ERROR, f, "%s: tensor map address %p is not 64-byte aligned", what, map);
    if (mc_space_of(ex, map) == McSpace::Shared)
        ex->fail(QV_PTX_ERROR, f, "%s: the tensor map at %p is in shared memory (param, const or global only)", what, map);
    QvTensorMap m;
    memcpy(&m, map, sizeof m);
    if (m.magic != QV_TMAP_MAGIC)
        ex->fail(QV_PTX_ERROR, f, "%s: the tensor map at %p was not encoded by cuTensorMapEncodeTiled (no valid map there)", what,
                 map);
    const char* why = nullptr;
    if (tmap_check(m, &why) != 0) ex->fail(QV_PTX_ERROR, f, "%s: corrupt tensor map at %p: %s", what, map, why);
    if (m.rank != 2) ex->fail(QV_PTX_ERROR, f, "%s with a tensor map of rank %u", what, m.rank);
    /* Swizzle mode B (1, 2, 3: 32, 64, 128 bytes) XORs address bits 4..4+B (the 16-byte chunk)
     * with bits 7..7+B, over a pattern of 128 << B bytes that starts at an aligned destination. */
    const uint32_t es = m.elem_size, row = m.box[0] * es, rows = m.box[1], bytes = row * rows;
    const uint32_t sw = m.swizzle, span = sw ? 16u << sw : 0;
    if (sw && row != span)
        ex->fail(QV_PTX_ERROR, f, "%s: %u-byte swizzle with %u-byte box rows (the emulator needs exactly %u)", what, span,
                 row, span);
    const uintptr_t align = sw ? (uintptr_t)128 << sw : 128;
    if ((uintptr_t)dst & (align - 1))
        ex->fail(QV_PTX_ERROR, f, "%s: destination %p is not %u-byte aligned%s", what, dst, (unsigned)align,
                 sw ? " (the swizzle pattern's start)" : "");
    if (mc_space_of(ex, dst) != McSpace::Shared || mc_space_of(ex, (uint8_t*)dst + bytes - 1) != McSpace::Shared)
        ex->fail(QV_PTX_ERROR, f, "%s: destination [%p, +%u) is not inside shared memory", what, dst, bytes);
    Mbar& b = ex->mbar_of(f, bar, what);
    const uint32_t idx = (uint32_t)(&b - ex->mbars.data());
    TmaCopy c;
    c.dst = (uint8_t*)dst;
    c.bytes = bytes;
    c.data.assign(bytes, m.oob_fill ? 0xff : 0);
    std::vector<uint8_t> line(row);
    const uint8_t* g = (const uint8_t*)(uintptr_t)m.global_addr;
    if (mc_space_of(ex, g) != McSpace::Global)
        ex->fail(QV_PTX_ERROR, f, "%s: the tensor's address %p is not global memory", what, (const void*)g);
    const int64_t x0 = std::max<int64_t>(c0, 0), x1 = std::min<int64_t>((int64_t)c0 + m.box[0], (int64_t)m.dims[0]);
    for (uint32_t r = 0; r < rows; ++r) {
        const int64_t y = (int64_t)c1 + r;
        memset(line.data(), m.oob_fill ? 0xff : 0, row);
        if (y >= 0 && (uint64_t)y < m.dims[1] && x1 > x0) {
            const uint8_t* src = g + (uint64_t)y * m.stride1 + (uint64_t)x0 * es;
            const uint32_t n = (uint32_t)(x1 - x0) * es;
            mc_bulk_read(src, n);
            memcpy(line.data() + (x0 - c0) * es, src, n);
        }
        uint8_t* out = c.data.data() + (size_t)r * row;
        if (sw) {
            const uint32_t x = ((r * span) >> 7) & ((1u << sw) - 1);
            for (uint32_t j = 0; j < span / 16; ++j) memcpy(out + 16 * (j ^ x), line.data() + 16 * j, 16);
        } else
            memcpy(out, line.data(), row);
    }
    mc_bulk_request(bytes);
    memset(dst, kPoison, bytes); /* undefined until the phase that counts it completes */
    b.copies.push_back(std::move(c));
    if (b.pending == 0 && b.waiters) ex->mbar_resolve(f, idx);
}

/* wgmma descriptors. The real one holds the shared-window address >> 4 in bits 0-13; here bits 0-13
 * hold the host address's bits 4-17 the same way (so descriptor arithmetic on the start address
 * works as on hardware) and bits 52-61 (reserved in the ISA) name the 256 KiB-aligned window
 * holding the rest of the address (the executor's table). The other fields are the real ones. */
uint64_t wgmma_desc_sw128(const void* tile) {
    Fiber* f = self();
    Executor* ex = f->ex;
    if (mc_space_of(ex, tile) != McSpace::Shared)
        ex->fail(QV_PTX_ERROR, f, "wgmma descriptor for %p, which is not shared memory", tile);
    const uintptr_t a = (uintptr_t)tile, base = a & ~(uintptr_t)0x3ffff;
    size_t w = 0;
    while (w < ex->smem_windows.size() && ex->smem_windows[w] != base) ++w;
    if (w == ex->smem_windows.size()) {
        if (w >= 1024) ex->fail(QV_PTX_ERROR, f, "too many shared-memory windows in wgmma descriptors");
        ex->smem_windows.push_back(base);
    }
    return ((a & 0x3ffff) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62) | ((uint64_t)w << 52);
}

void wgmma_bf16(float* d, const uint32_t* a, uint64_t desc, bool accumulate, int n) {
    Fiber* f = self();
    Executor* ex = f->ex;
    if (ex->T % 128)
        ex->fail(QV_PTX_ERROR, f, "%s in a CTA of %u threads (warpgroups need a multiple of 128)", op_name(Op::Wgmma, (uint32_t)n),
                 ex->T);
    Warp& w = ex->warps[f->warp];
    LaneSlot& s = w.slot[f->lane];
    memcpy(s.a, a, sizeof s.a);
    s.d = d;
    s.in = desc;
    s.src = accumulate ? 1 : 0;
    if (!ex->warp_arrive(f, Op::Wgmma, (uint32_t)n, 0xffffffffu)) {
        f->state = St::AtWarp;
        ex->suspend(f);
        return;
    }
    /* The warp is complete: now the warpgroup. */
    const uint32_t g = f->warp / 4;
    Executor::WgState& st = ex->wgs[g];
    if (st.warps == 0) st.n = (uint32_t)n;
    else if (st.n != (uint32_t)n)
        ex->fail(QV_PTX_ERROR, f, "warps of warpgroup %u disagree: warp %u executes %s while warps 0x%x wait at %s", g, f->warp,
                 op_name(Op::Wgmma, (uint32_t)n), st.warps, op_name(Op::Wgmma, st.n));
    st.warps |= 1u << (f->warp % 4);
    if (st.warps != 0xf) {
        f->state = St::AtWarp;
        ex->suspend(f);
        return;
    }
    ex->wg_issue(f, g);
}

/* All 128 threads of warpgroup g are at the wgmma: capture the operation, release them. */
void Executor::wg_issue(Fiber* f, uint32_t g) {
    const uint32_t n = wgs[g].n, per = n / 2;
    WgOp* op;
    if (!wg_free.empty()) {
        op = wg_free.back();
        wg_free.pop_back();
    } else {
        op = new WgOp();
    }
    const uint32_t idx = (uint32_t)wg_ops.size();
    wg_ops.push_back(op);
    op->n = n;
    op->computed = false;
    op->refs = 128;
    op->deps.clear();
    op->buf.assign((size_t)128 * per, 0.0f);
    const LaneSlot& s0 = warps[4 * g].slot[0];
    op->desc = s0.in;
    op->acc = s0.src != 0;
    for (uint32_t tid = 0; tid < 128; ++tid) {
        const LaneSlot& s = warps[4 * g + tid / 32].slot[tid % 32];
        Fiber* t = fibers[128 * g + tid];
        if (s.in != op->desc || (s.src != 0) != op->acc)
            fail(QV_PTX_ERROR, f,
                 "threads of warpgroup %u disagree on %s: thread %u has descriptor 0x%016llx, scale-d %d; thread %u 0x%016llx, %d",
                 g, op_name(Op::Wgmma, n), 128 * g, (unsigned long long)op->desc, (int)op->acc, 128 * g + tid,
                 (unsigned long long)s.in, (int)(s.src != 0));
        memcpy(op->a[tid], s.a, sizeof op->a[tid]);
        op->dptr[tid] = s.d;
        op->chain[tid] = -1;
        if (op->acc) {
            for (size_t k = t->wg_pend.size(); k-- > 0;) {
                const WgOp* p = wg_ops[t->wg_pend[k].op];
                if (p->dptr[tid] == s.d && p->n == n) {
                    op->chain[tid] = (int32_t)t->wg_pend[k].op;
                    break;
                }
            }
            if (op->chain[tid] < 0) memcpy(&op->buf[(size_t)tid * per], s.d, per * sizeof(float));
            else if (std::find(op->deps.begin(), op->deps.end(), (uint32_t)op->chain[tid]) == op->deps.end()) {
                op->deps.push_back((uint32_t)op->chain[tid]);
                ++wg_ops[op->chain[tid]]->refs;
            }
        }
        memset(s.d, kPoison, per * sizeof(float)); /* NaN until a wgmma.wait_group retires it */
        t->wg_pend.push_back(Fiber::WgPend{idx, t->wg_committed});
    }
    ctr.mma += n / 2; /* 4 warps x n/8 m16n8k16 */
    for (uint32_t k = 0; k < 4; ++k) {
        Warp& w = warps[4 * g + k];
        for (uint32_t l = 0; l < 32; ++l) {
            Fiber* t = fibers[32 * (4 * g + k) + l];
            if (t != f) t->state = St::Runnable;
        }
        w.arrived = 0;
        w.op = Op::None;
    }
    wgs[g].warps = 0;
}

void Executor::wg_release(uint32_t idx) {
    WgOp* op = wg_ops[idx];
    if (--op->refs) return;
    wg_ops[idx] = nullptr;
    wg_free.push_back(op);
}

/* D = A B + (scale-d ? C : 0) for the whole warpgroup, B read now through the descriptor. */
void Executor::wg_compute(Fiber* f, uint32_t idx) {
    WgOp* op = wg_ops[idx];
    const uint32_t n = op->n, per = n / 2;
    const uint64_t desc = op->desc;
    const uint32_t win = (uint32_t)((desc >> 52) & 0x3ff);
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0 || win >= smem_windows.size())
        fail(QV_PTX_ERROR, f,
             "%s: matrix descriptor 0x%016llx is not one of wgmma_desc_sw128 (128-byte swizzle, base offset 0) in this emulator",
             op_name(Op::Wgmma, n), (unsigned long long)desc);
    const uintptr_t start = smem_windows[win] | ((desc & 0x3fff) << 4);
    const uintptr_t sbo = ((desc >> 32) & 0x3fff) << 4;
    /* B[k][c]: K-major rows of 128 bytes, row groups of 8 sbo apart, swizzled on the address. */
    typedef float v8 __attribute__((vector_size(32)));
    static thread_local std::vector<float> Bk, D;
    Bk.assign((size_t)16 * n, 0.0f);
    D.assign((size_t)64 * n, 0.0f);
    for (uint32_t c = 0; c < n; ++c) {
        const uintptr_t rowaddr = start + (c / 8) * sbo + (c % 8) * 128;
        for (uint32_t k = 0; k < 16; k += 8) {
            uintptr_t a = rowaddr + 2 * k; /* 8 bf16 = one 16-byte chunk, 16-byte aligned if start is */
            a ^= ((a >> 7) & 7) << 4;
            if (mc_space_of(this, (void*)a) != McSpace::Shared || mc_space_of(this, (void*)(a + 15)) != McSpace::Shared)
                fail(QV_PTX_ERROR, f, "%s: B element address %p (column %u, k %u) is outside shared memory", op_name(Op::Wgmma, n),
                     (void*)a, c, k);
            for (uint32_t e = 0; e < 8; ++e) {
                uintptr_t ae = rowaddr + 2 * (k + e);
                ae ^= ((ae >> 7) & 7) << 4;
                uint16_t bits;
                memcpy(&bits, (const void*)ae, 2);
                Bk[(size_t)(k + e) * n + c] = __uint_as_float((uint32_t)bits << 16);
            }
        }
    }
    if (g_mc) {
        g_mc->c.shared_ld_bytes += 32ull * n;
        ++g_mc->c.shared_requests;
    }
    float A[64][16];
    for (uint32_t tid = 0; tid < 128; ++tid) {
        const uint32_t w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
        const uint32_t* r = op->a[tid];
        const uint32_t r0 = 16 * w + g, r1 = r0 + 8;
        const uint32_t pos[4][2] = {{r0, 2 * t}, {r1, 2 * t}, {r0, 2 * t + 8}, {r1, 2 * t + 8}};
        for (int i = 0; i < 4; ++i) {
            A[pos[i][0]][pos[i][1]] = __uint_as_float(r[i] << 16);
            A[pos[i][0]][pos[i][1] + 1] = __uint_as_float(r[i] & 0xffff0000u);
        }
        if (!op->acc) continue;
        const float* in = op->chain[tid] >= 0 ? &wg_ops[op->chain[tid]]->buf[(size_t)tid * per] : &op->buf[(size_t)tid * per];
        for (uint32_t i = 0; i < n / 8; ++i) {
            const uint32_t c = 8 * i + 2 * t;
            D[(size_t)r0 * n + c] = in[4 * i + 0];
            D[(size_t)r0 * n + c + 1] = in[4 * i + 1];
            D[(size_t)r1 * n + c] = in[4 * i + 2];
            D[(size_t)r1 * n + c + 1] = in[4 * i + 3];
        }
    }
    /* ((c + p0) + p1) + ... + p15, k ascending: exact products, every add rounded (8 columns per
     * vector operation, each element still one multiply and one add). */
    for (uint32_t r = 0; r < 64; ++r) {
        float* drow = &D[(size_t)r * n];
        for (uint32_t k = 0; k < 16; ++k) {
            const float av = A[r][k];
            const v8 a8 = {av, av, av, av, av, av, av, av};
            const float* brow = &Bk[(size_t)k * n];
            for (uint32_t c = 0; c < n; c += 8) {
                v8 dv, bv;
                memcpy(&dv, drow + c, 32);
                memcpy(&bv, brow + c, 32);
                dv = dv + a8 * bv;
                memcpy(drow + c, &dv, 32);
            }
        }
    }
    for (uint32_t tid = 0; tid < 128; ++tid) {
        const uint32_t w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
        const uint32_t r0 = 16 * w + g, r1 = r0 + 8;
        float* out = &op->buf[(size_t)tid * per];
        for (uint32_t i = 0; i < n / 8; ++i) {
            const uint32_t c = 8 * i + 2 * t;
            out[4 * i + 0] = D[(size_t)r0 * n + c];
            out[4 * i + 1] = D[(size_t)r0 * n + c + 1];
            out[4 * i + 2] = D[(size_t)r1 * n + c];
            out[4 * i + 3] = D[(size_t)r1 * n + c + 1];
        }
    }
    op->computed = true;
    for (uint32_t dep : op->deps) wg_release(dep);
    op->deps.clear();
}

/* Retires the thread's wgmma of groups < below, in issue order: the first thread to retire an
 * operation computes it for the whole warpgroup (reading B now); each thread gets its own d. */
void Executor::wg_retire(Fiber* f, uint64_t below) {
    const uint32_t tid = f->linear % 128;
    size_t k = 0;
    for (size_t i = 0; i < f->wg_pend.size(); ++i) {
        const Fiber::WgPend p = f->wg_pend[i];
        if (p.group >= below) {
            f->wg_pend[k++] = p;
            continue;
        }
        WgOp* op = wg_ops[p.op];
        if (!op->computed) wg_compute(f, p.op);
        /* A later wgmma still in flight on the same d owns those registers: they stay undefined (NaN). */
        bool owned = false;
        for (size_t j = i + 1; j < f->wg_pend.size() && !owned; ++j)
            owned = f->wg_pend[j].group >= below && wg_ops[f->wg_pend[j].op]->dptr[tid] == op->dptr[tid];
        if (!owned) memcpy(op->dptr[tid], &op->buf[(size_t)tid * (op->n / 2)], (op->n / 2) * sizeof(float));
        wg_release(p.op);
    }
    f->wg_pend.resize(k);
}

void wgmma_commit() { ++self()->wg_committed; }

void wgmma_wait(int n) {
    Fiber* f = self();
    if (f->wg_committed > (uint64_t)n) f->ex->wg_retire(f, f->wg_committed - (uint64_t)n);
}

/* cuTensorMapEncodeTiled's rules for a map (shared by qv_tensor_map_encode and the TMA's own check
 * of a map it reads). */
uint32_t tmap_elem_size(uint32_t dtype) {
    static const uint8_t sz[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};
    return dtype < sizeof sz ? sz[dtype] : 0;
}

int32_t tmap_check(const QvTensorMap& m, const char** why) {
    *why = nullptr;
    const uint32_t es = tmap_elem_size(m.dtype);
    if (!es || es != m.elem_size) *why = "unsupported data type";
    else if (m.rank < 1 || m.rank > 5) *why = "rank outside 1..5";
    else if (m.rank != 2) *why = "rank other than 2 (not emulated)";
    else if (!m.global_addr || (m.global_addr & 15)) *why = "global address not 16-byte aligned";
    else if (m.dims[0] < 1 || m.dims[1] < 1 || m.dims[0] > (1ull << 32) || m.dims[1] > (1ull << 32)) *why = "a dimension outside 1..2^32";
    else if ((m.stride1 & 15) || m.stride1 >= (1ull << 40)) *why = "global stride not a multiple of 16 below 2^40";
    else if (m.stride1 < m.dims[0] * es) *why = "global stride smaller than a row";
    else if (m.box[0] < 1 || m.box[0] > 256 || m.box[1] < 1 || m.box[1] > 256) *why = "box dimension outside 1..256";
    else if ((m.box[0] * es) % 16) *why = "box row not a multiple of 16 bytes";
    else if (m.interleave != 0) *why = "interleaved layouts are not emulated";
    else if (m.swizzle > 3) *why = "unknown swizzle";
    else if (m.swizzle && m.box[0] * es > (16u << m.swizzle)) *why = "box row wider than the swizzle span";
    else if (m.l2_promotion > 3) *why = "unknown L2 promotion";
    else if (m.oob_fill > 1) *why = "unknown OOB fill";
    else if (m.oob_fill == 1 && m.dtype < 6) *why = "NaN OOB fill needs a float type";
    return *why ? 1 : 0;
}

/* ---- launching ---------------------------------------------------------------------------------- */

int launch_fn(const char* name, Invoke invoke, void* fn, const void* args, size_t args_size, QvDim3 grid, QvDim3 block,
              uint32_t dyn_smem, QvCounters* counters, QvStatus* status) {
    if (!name) {
        name = "(unregistered kernel)";
        for (const KernelReg* r : kernels())
            if (r->fn == fn) name = r->name;
    }
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (threads > kMaxThreads) {
        set_status(status, QV_BAD_ARGS, "vgpu: kernel '%s': a block of %llu threads (at most %u)", name,
                   (unsigned long long)threads, kMaxThreads);
        return QV_BAD_ARGS;
    }
    set_status(status, QV_OK, "ok");
    const uint64_t total = (uint64_t)grid.x * grid.y * grid.z;
    if (total == 0 || threads == 0) return QV_OK;
    install_handlers();
    Executor& me = caller_executor();

    /* The argument struct is passed by value: the launch keeps its own copy. */
    void* copy = ::operator new(args_size ? args_size : 1, std::align_val_t(64));
    memcpy(copy, args, args_size);
    Launch l;
    l.name = name;
    l.invoke = invoke;
    l.fn = fn;
    l.args = copy;
    l.args_size = args_size;
    l.grid = grid;
    l.block = block;
    l.dyn_smem = dyn_smem;
    l.total = total;

    Pool& p = pool();
    bool shared = false;
    {
        std::lock_guard<std::mutex> g(p.mu);
        const unsigned helpers = (unsigned)std::min<uint64_t>(p.helpers, total - 1);
        if (helpers) {
            p.spawn(p.helpers);
            p.q.push_back(&l);
            shared = true;
            if (helpers == 1) p.cv.notify_one();
            else p.cv.notify_all();
        }
    }
    me.work(l);
    if (shared) {
        std::unique_lock<std::mutex> lk(p.mu);
        for (auto it = p.q.begin(); it != p.q.end(); ++it)
            if (*it == &l) {
                p.q.erase(it);
                break;
            }
        l.idle.wait(lk, [&] { return l.active == 0; });
    }
    ::operator delete(copy, std::align_val_t(64));
    if (counters) add_counters(*counters, l.ctr);
    if (l.failed.load()) {
        if (status) *status = l.status;
        return l.status.code;
    }
    return QV_OK;
}

}  // namespace qv

/* ---- C ABI (vgpu_abi.h) ---------------------------------------------------------------------------- */

extern "C" {

size_t qv_kernel_count(void) { return qv::kernels().size(); }

const char* qv_kernel_name(size_t i) {
    const auto& k = qv::kernels();
    return i < k.size() ? k[i]->name : nullptr;
}

size_t qv_kernel_args_size(const char* name) {
    const qv::KernelReg* r = name ? qv::find_kernel(name) : nullptr;
    return r ? r->args_size : 0;
}

int32_t qv_launch(const char* name, const void* args, size_t args_size, QvDim3 grid, QvDim3 block, uint32_t dyn_smem,
                  QvCounters* counters, QvStatus* status) {
    const qv::KernelReg* r = name ? qv::find_kernel(name) : nullptr;
    if (!r) {
        qv::set_status(status, QV_UNKNOWN_KERNEL, "vgpu: no kernel named '%s'", name ? name : "(null)");
        return QV_UNKNOWN_KERNEL;
    }
    if (args_size != r->args_size) {
        qv::set_status(status, QV_BAD_ARGS, "vgpu: kernel '%s' takes %zu bytes of arguments, got %zu", r->name, r->args_size,
                       args_size);
        return QV_BAD_ARGS;
    }
    return qv::launch_fn(r->name, r->invoke, r->fn, args, args_size, grid, block, dyn_smem, counters, status);
}

int32_t qv_tensor_map_encode(void* out, uint32_t dtype, uint32_t rank, const void* global_addr, const uint64_t* dims,
                             const uint64_t* strides, const uint32_t* box, const uint32_t* elem_strides, uint32_t interleave,
                             uint32_t swizzle, uint32_t l2_promotion, uint32_t oob_fill) {
    if (!out || !dims || !box || !elem_strides || (rank > 1 && !strides) || rank < 1 || rank > 5) return 1;
    for (uint32_t i = 0; i < rank; ++i)
        if (elem_strides[i] != 1) return 1; /* 1..8 on a GPU; only 1 is emulated */
    QvTensorMap m{};
    m.magic = QV_TMAP_MAGIC;
    m.global_addr = (uint64_t)(uintptr_t)global_addr;
    m.rank = rank;
    m.elem_size = qv::tmap_elem_size(dtype);
    m.dtype = dtype;
    m.swizzle = swizzle;
    m.dims[0] = dims[0];
    m.dims[1] = rank > 1 ? dims[1] : 1;
    m.stride1 = rank > 1 ? strides[0] : 0;
    m.box[0] = box[0];
    m.box[1] = rank > 1 ? box[1] : 1;
    m.oob_fill = oob_fill;
    m.interleave = interleave;
    m.l2_promotion = l2_promotion;
    const char* why;
    if (qv::tmap_check(m, &why) != 0) return 1;
    memset(out, 0, 128);
    memcpy(out, &m, sizeof m);
    return 0;
}

void qv_set_workers(uint32_t n) {
    qv::Pool& p = qv::pool();
    std::lock_guard<std::mutex> g(p.mu);
    p.helpers = n > 1 ? n - 1 : 0;
    p.cv.notify_all();
}

}  // extern "C"

/* Strong references to every kernel qadapt.h declares, so that a program linking this runtime out
 * of a static library also links every kernel object (their registrations are static
 * initializers that nothing else refers to). The small runners, which compile only some kernel
 * files, include this file with QV_NO_KERNEL_ANCHORS (cuda_emu_runtime.h). */
#ifndef QV_NO_KERNEL_ANCHORS
#undef QV_KERNEL_ANCHOR
#define QV_KERNEL_ANCHOR(name, n) __attribute__((used)) static void* const qv_anchor_##name##_##n = (void*)&name;
#include "qadapt.h"
#endif
