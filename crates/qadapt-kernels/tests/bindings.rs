//! `src/ffi.rs` and `src/vgpu_ffi.rs` are bindgen's output for `kernels/include/qadapt.h` and
//! `kernels/emu/vgpu_abi.h`, committed so that building needs no libclang. This test regenerates
//! them and fails when a committed file is stale; `just bindings` (`QADAPT_BLESS_BINDINGS=1`)
//! writes the fresh output instead.
//!
//! bindgen loads libclang at run time. Without it the test cannot check anything: it fails when
//! `QADAPT_REQUIRE_CUDA=1` (set by `just test` and CI, whose `just setup` installs libclang) and
//! otherwise says on stderr that it checked nothing.

use std::path::PathBuf;

/// The committed bindings: (file under src/, header under kernels/, bindgen's options for it).
/// `ffi.rs`: the argument structs, enums and constants of the kernels' ABI header, no functions
/// (kernels are looked up by name, not linked). `vgpu_ffi.rs`: the structs and status codes the
/// virtual device's emulator shares with Rust (its functions are declared by qadapt-vgpu, which
/// links them); every comment becomes documentation, so a counter's meaning is written once.
/// Both with layout tests, so a Rust struct that drifts from its C twin fails `cargo test`.
fn bindings() -> Vec<(&'static str, &'static str, bindgen::Builder)> {
    let common = || {
        bindgen::Builder::default()
            .blocklist_function(".*")
            .derive_default(true)
            .derive_debug(true)
            .derive_copy(true)
            .layout_tests(true)
    };
    vec![
        (
            "ffi.rs",
            "include/qadapt.h",
            common()
                .allowlist_type("Qadapt.*")
                .allowlist_var("QADAPT_.*")
                .rustified_enum("QadaptDtype")
                // 64-byte aligned: bindgen's Default for them would be an unsafe zeroing.
                .no_default("QadaptTensorMap")
                .no_default("QadaptLoraSm90Args")
                .no_default("QadaptLoraBwdSm90Args"),
        ),
        (
            "vgpu_ffi.rs",
            "emu/vgpu_abi.h",
            common()
                .allowlist_type("Qv.*")
                .allowlist_var("QV_.*")
                .no_default("QvStatus")
                .derive_eq(true)
                .derive_partialeq(true)
                .clang_arg("-fparse-all-comments"),
        ),
    ]
}

#[test]
fn committed_bindings_match_the_headers() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if !clang_present() {
        let msg = "libclang not found: the committed bindings (src/ffi.rs, src/vgpu_ffi.rs) were \
                   not checked against their headers. Run `just setup` to install it.";
        assert!(
            std::env::var("QADAPT_REQUIRE_CUDA").as_deref() != Ok("1"),
            "QADAPT_REQUIRE_CUDA=1: {msg}"
        );
        eprintln!("NOT CHECKED: {msg}");
        return;
    }
    let bless = std::env::var("QADAPT_BLESS_BINDINGS").as_deref() == Ok("1");
    for (file, header, builder) in bindings() {
        let header = crate_dir.join("kernels").join(header);
        let committed_path = crate_dir.join("src").join(file);
        let fresh = builder
            .header(header.to_string_lossy())
            .generate()
            .unwrap_or_else(|e| panic!("bindgen on {}: {e}", header.display()))
            .to_string();
        if bless {
            std::fs::write(&committed_path, &fresh).expect("write the bindings");
            continue;
        }
        let committed = std::fs::read_to_string(&committed_path).expect("read the bindings");
        if committed != fresh {
            let line = committed
                .lines()
                .zip(fresh.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(committed.lines().count().min(fresh.lines().count()));
            panic!(
                "src/{file} is stale: it differs from bindgen's output for {} from line {} on \
                 (committed: {:?}, fresh: {:?}). Run `just bindings` and commit it.",
                header.display(),
                line + 1,
                committed.lines().nth(line),
                fresh.lines().nth(line)
            );
        }
    }
}

/// Whether bindgen can load libclang. Its `runtime` feature loads the library on first use and
/// panics when there is none, so the probe runs under `catch_unwind`.
fn clang_present() -> bool {
    std::panic::catch_unwind(bindgen::clang_version).is_ok_and(|v| v.parsed.is_some())
}
