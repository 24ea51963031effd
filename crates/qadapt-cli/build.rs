//! Links `src/cpu_check.c` into the binary on x86-64: a constructor, compiled for the x86-64
//! baseline, that stops with one line on a CPU lacking an extension the Rust code was compiled for
//! (see that file). The object is passed to the linker directly, so the constructor is kept even
//! though nothing calls it.

use std::env;

/// The `target_feature` names the check knows, in the order of its `QADAPT_BUILT_*` defines.
const FEATURES: &[&str] = &[
    "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe",
];

fn main() {
    println!("cargo::rerun-if-changed=src/cpu_check.c");
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        return;
    }
    let enabled = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let enabled: Vec<&str> = enabled.split(',').collect();
    let mut build = cc::Build::new();
    build.file("src/cpu_check.c").opt_level(2).warnings(true);
    for f in FEATURES {
        let on = if enabled.contains(f) { "1" } else { "0" };
        build.define(&format!("QADAPT_BUILT_{}", f.to_uppercase()), on);
    }
    for object in build.compile_intermediates() {
        println!("cargo::rustc-link-arg-bins={}", object.display());
    }
}
