//! Whether this build uses the x86 extensions the running CPU offers.
//!
//! The workspace builds for `x86-64-v3` (`.cargo/config.toml`: AVX, AVX2, FMA, BMI1/2, F16C,
//! LZCNT, MOVBE) because code built for the baseline pays a vector-state transition penalty next
//! to the GEMM crates' AVX-512 kernels (BENCHMARKS.md, "CPU LoRA training step"). A crate that
//! depends on qadapt and builds without that setting runs anywhere, but slower: [`build_advice`]
//! says so, for a program to show. (The opposite case, a v3 build on an older CPU, cannot be
//! checked from Rust code built for v3, which may itself use those instructions; the `qadapt`
//! binary checks it in C before `main`, `crates/qadapt-cli/src/cpu_check.c`.)
//!
//! `is_x86_feature_detected!` answers `true` at compile time for every feature the build enables,
//! so the CPU is asked directly with `cpuid`, which every x86-64 CPU has.

/// Advice when the CPU has AVX2 and FMA but this build does not use them (a crate built without
/// the workspace's `-C target-cpu=x86-64-v3`): CPU training then runs several times slower.
pub fn build_advice() -> Option<&'static str> {
    let t = table();
    let has = |n: &str| t.iter().any(|&(name, _, present)| name == n && present);
    let built = cfg!(all(target_feature = "avx2", target_feature = "fma"));
    (!built && has("avx2") && has("fma")).then_some(
        "qadapt was built for the x86-64 baseline on a CPU with AVX2 and FMA: CPU training runs \
         up to 4x slower than built with RUSTFLAGS=\"-C target-cpu=x86-64-v3\" (or native)",
    )
}

/// `(target_feature name, enabled in this build, present on this CPU)` for the x86-64-v3 set.
#[cfg(target_arch = "x86_64")]
fn table() -> Vec<(&'static str, bool, bool)> {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let bit = |reg: u32, b: u32| reg >> b & 1 == 1;
    let max_leaf = __cpuid(0).eax;
    let l1 = __cpuid(1);
    let l7_ebx = if max_leaf >= 7 {
        __cpuid_count(7, 0).ebx
    } else {
        0
    };
    let ext_ecx = if __cpuid(0x8000_0000).eax >= 0x8000_0001 {
        __cpuid(0x8000_0001).ecx
    } else {
        0
    };
    let avx = bit(l1.ecx, 28) && bit(l1.ecx, 27);
    vec![
        ("avx", cfg!(target_feature = "avx"), avx),
        ("avx2", cfg!(target_feature = "avx2"), avx && bit(l7_ebx, 5)),
        ("fma", cfg!(target_feature = "fma"), avx && bit(l1.ecx, 12)),
        (
            "f16c",
            cfg!(target_feature = "f16c"),
            avx && bit(l1.ecx, 29),
        ),
        ("bmi1", cfg!(target_feature = "bmi1"), bit(l7_ebx, 3)),
        ("bmi2", cfg!(target_feature = "bmi2"), bit(l7_ebx, 8)),
        ("lzcnt", cfg!(target_feature = "lzcnt"), bit(ext_ecx, 5)),
        ("movbe", cfg!(target_feature = "movbe"), bit(l1.ecx, 22)),
    ]
}

#[cfg(not(target_arch = "x86_64"))]
fn table() -> Vec<(&'static str, bool, bool)> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary was built with the workspace's flags and runs, so the CPU has what it was
    /// built for; and a build that uses AVX2 and FMA gives no advice.
    #[test]
    fn a_running_build_has_what_it_was_built_for() {
        for (name, built, present) in table() {
            assert!(!built || present, "{name} built for but absent");
        }
        if cfg!(all(target_feature = "avx2", target_feature = "fma")) {
            assert!(build_advice().is_none());
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn cpuid_agrees_with_std_detection() {
        // std's runtime detection (cpuid + xgetbv) answers `true` at compile time for enabled
        // features, so it is only a witness for the features this build did not enable.
        for (name, built, present) in table() {
            if built {
                continue;
            }
            let std_says = match name {
                "avx" => std::arch::is_x86_feature_detected!("avx"),
                "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                "fma" => std::arch::is_x86_feature_detected!("fma"),
                "f16c" => std::arch::is_x86_feature_detected!("f16c"),
                "bmi1" => std::arch::is_x86_feature_detected!("bmi1"),
                "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
                "lzcnt" => std::arch::is_x86_feature_detected!("lzcnt"),
                "movbe" => std::arch::is_x86_feature_detected!("movbe"),
                other => panic!("unexpected feature {other}"),
            };
            assert_eq!(present, std_says, "{name}");
        }
    }
}
