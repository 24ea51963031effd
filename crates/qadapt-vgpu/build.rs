//! Compiles the kernel emulator into the virtual driver.
//!
//! With the `emu` feature: every `kernels/*.cu` as host C++20 (`-DQADAPT_EMU`, the emulated CUDA
//! headers of `kernels/emu` first on the include path), plus `kernels/emu/vgpu_*.cpp` (the runtime
//! behind `kernels/emu/vgpu_abi.h`; self-tests excluded), linked into the cdylib; `cfg(qv_runtime)`
//! tells the Rust side. The flags are `kernels/emu/emu.flags`' (the one place that spells them):
//! `common:` for every object, plus `memcheck:` for the kernels only (GCC's ThreadSanitizer
//! instrumentation as a callback mechanism: every load and store of kernel code is checked and
//! counted by `vgpu_memcheck.inc`; the runtime, which defines those callbacks, is never
//! instrumented, and nothing links libtsan). Without the feature nothing is compiled and no kernel is registered, which
//! keeps `cargo build --workspace` cheap (`just vgpu` turns the feature on).
//!
//! The library is linked `-z nodelete`: cudarc probes the driver with dlopen + dlclose before it
//! keeps it loaded, and unloading a library whose emulator may own threads or signal handlers
//! would pull code out from under them.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().parent().unwrap().to_path_buf();
    let kernels = root.join("kernels");
    let emu = kernels.join("emu");
    let include = kernels.join("include");

    println!("cargo::rustc-check-cfg=cfg(qv_runtime)");
    println!("cargo::rerun-if-changed={}", kernels.display());
    println!("cargo::rerun-if-changed={}", emu.display());
    println!("cargo::rerun-if-env-changed=CXX");
    println!("cargo::rerun-if-env-changed=CXXFLAGS");
    println!("cargo::rustc-cdylib-link-arg=-Wl,-z,nodelete");

    if env::var_os("CARGO_FEATURE_EMU").is_none() {
        return;
    }

    let runtime = emu.join("vgpu_runtime.cpp");
    assert!(
        runtime.exists(),
        "feature `emu`: {} is missing (the kernel emulator's runtime)",
        runtime.display()
    );
    let mut sources: Vec<PathBuf> = files(&kernels, "cu");
    sources.extend(files(&emu, "cpp").into_iter().filter(|p| {
        let name = p.file_name().unwrap().to_string_lossy();
        name.starts_with("vgpu_") && !name.contains("selftest")
    }));
    let headers = [
        files(&emu, "h"),
        files(&emu, "cuh"),
        files(&emu, "inc"),
        files(&include, "h"),
        files(&include, "cuh"),
    ];
    for s in headers.iter().flatten() {
        println!("cargo::rerun-if-changed={}", s.display());
    }
    for s in &sources {
        println!("cargo::rerun-if-changed={}", s.display());
    }

    let flags_file = emu.join("emu.flags");
    println!("cargo::rerun-if-changed={}", flags_file.display());
    let flags = fs::read_to_string(&flags_file)
        .unwrap_or_else(|e| panic!("feature `emu`: {}: {e}", flags_file.display()));
    let line = |name: &str| -> Vec<String> {
        flags
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{} has no `{name}:` line", flags_file.display()))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .opt_level(2)
            .debug(false)
            .warnings(false)
            .flag("-x")
            .flag("c++")
            .include(&emu)
            .include(&include);
        for f in line("common") {
            b.flag(f);
        }
        b
    };
    // The kernels, instrumented; their objects go into the runtime's archive (they and the
    // runtime refer to each other: registrations, anchors, callbacks).
    let (kernel_sources, runtime_sources): (Vec<&PathBuf>, Vec<&PathBuf>) = sources
        .iter()
        .partition(|p| p.extension().is_some_and(|x| x == "cu"));
    let mut kernels_build = base();
    for f in line("memcheck") {
        kernels_build.flag(f);
    }
    for s in &kernel_sources {
        kernels_build.file(s);
    }
    let kernel_objects = kernels_build.compile_intermediates();
    let mut build = base();
    for s in &runtime_sources {
        build.file(s);
    }
    build.objects(&kernel_objects);
    build.compile("qadapt_vgpu_emu");
    println!("cargo::rustc-link-lib=pthread");
    println!("cargo::rustc-cfg=qv_runtime");
}

/// The files of `dir` (not recursive) with extension `ext`, sorted.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
