/* Before main: stop with one line when the CPU lacks an x86-64 extension this binary was built for.
 *
 * The workspace compiles Rust for x86-64-v3 (.cargo/config.toml), so any Rust function, the check
 * itself included, may contain AVX2/BMI2/... instructions (rustc emitted `mulx` in a Rust version
 * of this check). This file is compiled by build.rs for the x86-64 baseline, linked into the
 * binary as an object, and runs as an ELF constructor, before any Rust code: on an older CPU the
 * user reads which extensions are missing instead of dying of SIGILL.
 *
 * build.rs defines QADAPT_BUILT_<FEATURE> for each feature in the Rust build's
 * CARGO_CFG_TARGET_FEATURE, so the check asks for exactly what the build may use. cpuid bits: leaf
 * 1 ECX (FMA 12, MOVBE 22, OSXSAVE 27, AVX 28, F16C 29), leaf 7 EBX (BMI1 3, AVX2 5, BMI2 8),
 * leaf 0x80000001 ECX (LZCNT 5). The AVX family also needs the OS to save the YMM state (OSXSAVE,
 * then XCR0 bits 1 and 2, read with xgetbv). */
#include <cpuid.h>
#include <string.h>
#include <unistd.h>

static int bit(unsigned reg, int b) { return (int)((reg >> b) & 1u); }

static unsigned xcr0_low(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return lo;
}

static void need(char *list, int built, int present, const char *name) {
    if (built && !present) {
        if (list[0] != '\0') strcat(list, ", ");
        strcat(list, name);
    }
}

__attribute__((constructor)) static void qadapt_cpu_check(void) {
    unsigned a, b, c, d;
    unsigned l1c = 0, l7b = 0, e1c = 0;
    unsigned max = __get_cpuid_max(0, 0);
    if (max >= 1) {
        __cpuid(1, a, b, c, d);
        l1c = c;
    }
    if (max >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        l7b = b;
    }
    if (__get_cpuid_max(0x80000000u, 0) >= 0x80000001u) {
        __cpuid(0x80000001u, a, b, c, d);
        e1c = c;
    }
    int avx = bit(l1c, 28) && bit(l1c, 27) && (xcr0_low() & 6u) == 6u;

    char missing[128] = "";
    need(missing, QADAPT_BUILT_AVX, avx, "avx");
    need(missing, QADAPT_BUILT_AVX2, avx && bit(l7b, 5), "avx2");
    need(missing, QADAPT_BUILT_FMA, avx && bit(l1c, 12), "fma");
    need(missing, QADAPT_BUILT_F16C, avx && bit(l1c, 29), "f16c");
    need(missing, QADAPT_BUILT_BMI1, bit(l7b, 3), "bmi1");
    need(missing, QADAPT_BUILT_BMI2, bit(l7b, 8), "bmi2");
    need(missing, QADAPT_BUILT_LZCNT, bit(e1c, 5), "lzcnt");
    need(missing, QADAPT_BUILT_MOVBE, bit(l1c, 22), "movbe");
    if (missing[0] == '\0') return;

    char msg[512] = "error: this qadapt binary was built for x86-64-v3 and this CPU lacks ";
    strcat(msg, missing);
    strcat(msg, "; rebuild it on this machine with RUSTFLAGS=\"-C target-cpu=native\"\n");
    ssize_t ignored = write(2, msg, strlen(msg));
    (void)ignored;
    _exit(2);
}
