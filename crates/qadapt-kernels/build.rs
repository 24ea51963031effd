//! Compiles `kernels/*.cu` with nvcc into fatbins in OUT_DIR and writes the Rust list of kernels
//! declared in `kernels/include/qadapt.h`. The ABI bindings are not generated here: bindgen's
//! output is committed as `src/ffi.rs` (so a build needs no libclang), and
//! `tests/bindings.rs` fails when it no longer matches the header (`just bindings` rewrites it).
//!
//! nvcc is looked up in `NVCC`, then `$CUDA_HOME/bin/nvcc`, then the project's `.cuda/` (where
//! `just setup` installs the pinned CUDA 13.0 toolkit from PyPI), then `PATH`. Without nvcc the
//! build goes on CPU-only with a warning, unless `QADAPT_REQUIRE_CUDA=1`, which makes it fatal.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SASS targets, and the PTX target embedded for forward compatibility. Part of every artefact's
/// file name, so a change of target can never reuse a stale fatbin.
const SASS_ARCHS: &[&str] = &["sm_80", "sm_90"];
const PTX_ARCH: &str = "compute_90";
/// Files named `*_sm90.cu` hold sm_90a kernels (wgmma, TMA, setmaxnreg: `qadapt_sm90.cuh`) and
/// are built for that target only, without PTX (arch-specific features have no forward-compatible
/// PTX). The host loads such a module only on a compute capability 9.0 device.
const SM90A_SUFFIX: &str = "_sm90";
const SM90A_ARCH: &str = "sm_90a";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().parent().unwrap().to_path_buf();
    // `kernels` in this crate is a link to the workspace's top-level `kernels/`: the sources stay
    // where a reader looks for them, and `cargo package` (which follows the link) ships them.
    let kernels_dir = manifest.join("kernels");
    let header = kernels_dir.join("include").join("qadapt.h");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());

    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=QADAPT_REQUIRE_CUDA");
    println!("cargo::rerun-if-env-changed=QADAPT_KERNEL_LINEINFO");
    println!("cargo::rerun-if-changed={}", kernels_dir.display());
    println!("cargo::rustc-check-cfg=cfg(qadapt_cuda)");

    let mut sources: Vec<PathBuf> = Vec::new();
    let mut includes: Vec<PathBuf> = Vec::new();
    collect(&kernels_dir, &mut sources, &mut includes);
    sources.sort();
    for f in sources.iter().chain(&includes) {
        println!("cargo::rerun-if-changed={}", f.display());
    }

    let header_text = fs::read_to_string(&header).expect("read kernels/include/qadapt.h");
    let decls = kernel_decls(&header_text);
    let stems: Vec<String> = sources
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    check_decls_against_sources(&decls, &sources, &stems);

    let require = env::var("QADAPT_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let nvcc = find_nvcc(&root);
    let mut modules = Vec::new();
    match &nvcc {
        Some(nvcc) => {
            // One nvcc per file, all at once (each is mostly single-threaded; cargo's jobserver
            // is not consulted, as nvcc would not honour it either), results in file order.
            let results: Vec<_> = std::thread::scope(|scope| {
                let jobs: Vec<_> = sources
                    .iter()
                    .zip(&stems)
                    .map(|(src, stem)| {
                        let (kernels_dir, out) = (&kernels_dir, &out);
                        scope.spawn(move || compile(nvcc, src, stem, kernels_dir, out))
                    })
                    .collect();
                jobs.into_iter()
                    .map(|j| j.join().expect("an nvcc thread panicked"))
                    .collect()
            });
            for ((src, stem), result) in sources.iter().zip(&stems).zip(results) {
                match result {
                    Ok((fatbin, report)) => modules.push((stem.clone(), fatbin, report)),
                    Err(e) => {
                        if require {
                            panic!(
                                "QADAPT_REQUIRE_CUDA=1 and nvcc failed on {}:\n{e}",
                                src.display()
                            );
                        }
                        println!(
                            "cargo::warning=nvcc failed on {}; building CPU-only. First lines: {}",
                            src.display(),
                            e.lines().take(3).collect::<Vec<_>>().join(" | ")
                        );
                        modules.clear();
                        break;
                    }
                }
            }
        }
        None => {
            if require {
                panic!(
                    "QADAPT_REQUIRE_CUDA=1 but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin, \
                     {}/.cuda, PATH). Run `just setup`.",
                    root.display()
                );
            }
            println!(
                "cargo::warning=nvcc not found: building qadapt CPU-only (the CUDA device will report \
                 CudaNotCompiled). Run `just setup` to install the pinned CUDA 13.0 nvcc."
            );
        }
    }
    let compiled = !modules.is_empty() && modules.len() == sources.len();
    if compiled {
        println!("cargo::rustc-cfg=qadapt_cuda");
        println!("cargo::metadata=compiled=1");
    }
    if let Some(nvcc) = &nvcc {
        // cuobjdump lets tests read the SASS; it ships beside nvcc or in `.cuda/sass`.
        let bin = nvcc.parent().unwrap();
        let candidates = [
            bin.join("cuobjdump"),
            root.join(".cuda/sass/nvidia/cu13/bin/cuobjdump"),
        ];
        if let Some(c) = candidates.iter().find(|c| c.exists()) {
            println!("cargo::rustc-env=QADAPT_CUOBJDUMP={}", c.display());
        }
    }
    write_kernels_rs(&out, &decls, &stems, if compiled { &modules } else { &[] });
}

fn collect(dir: &Path, sources: &mut Vec<PathBuf>, includes: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else {
        panic!("kernels directory {} is missing", dir.display());
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, &mut Vec::new(), includes);
        } else if p.extension().is_some_and(|x| x == "cu") && p.parent() == Some(dir) {
            sources.push(p);
        } else {
            includes.push(p);
        }
    }
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut cands = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        cands.push(PathBuf::from(p));
    }
    if let Ok(h) = env::var("CUDA_HOME") {
        cands.push(Path::new(&h).join("bin/nvcc"));
    }
    cands.push(root.join(".cuda/nvidia/cu13/bin/nvcc"));
    if let Some(path) = env::var_os("PATH") {
        cands.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    cands.into_iter().find(|c| c.is_file())
}

/// One fatbin per .cu: `<stem>.<archs>.fatbin`, plus the ptxas `-v` report.
fn compile(
    nvcc: &Path,
    src: &Path,
    stem: &str,
    kernels_dir: &Path,
    out: &Path,
) -> Result<(PathBuf, PathBuf), String> {
    let sm90a = stem.ends_with(SM90A_SUFFIX);
    let tag = if sm90a {
        SM90A_ARCH.to_string()
    } else {
        format!("{}_{}", SASS_ARCHS.join("_"), PTX_ARCH)
    };
    let fatbin = out.join(format!("{stem}.{tag}.fatbin"));
    let report = out.join(format!("{stem}.{tag}.ptxas.txt"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("--Werror")
        .arg("all-warnings")
        .arg("-Xptxas")
        .arg("-v,-warn-spills,-warn-lmem-usage")
        .arg("-Xfatbin")
        .arg("-compress=false")
        .arg("-I")
        .arg(kernels_dir.join("include"));
    // Source line tables more than double the fatbin; on demand for profiling and sanitizing.
    if env::var("QADAPT_KERNEL_LINEINFO").is_ok_and(|v| v == "1") {
        cmd.arg("-lineinfo");
    }
    if sm90a {
        cmd.arg(format!("-gencode=arch=compute_90a,code={SM90A_ARCH}"));
    } else {
        for a in SASS_ARCHS {
            let num = a.trim_start_matches("sm_");
            cmd.arg(format!("-gencode=arch=compute_{num},code={a}"));
        }
        cmd.arg(format!("-gencode=arch={PTX_ARCH},code={PTX_ARCH}"));
    }
    cmd.arg("-o").arg(&fatbin).arg(src);
    let output = cmd
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(text);
    }
    fs::write(&report, &text).map_err(|e| e.to_string())?;
    Ok((fatbin, report))
}

/// `(name, args)` for every `QADAPT_KERNEL(name, Args);` prototype, with the module it is listed
/// under (the `/* kernels/<stem>.cu */` comment above it).
fn kernel_decls(header: &str) -> Vec<(String, String, String)> {
    let mut module = String::new();
    let mut decls = Vec::new();
    for line in header.lines() {
        let l = line.trim();
        if let Some(stem) = l
            .strip_prefix("/* kernels/")
            .and_then(|rest| rest.strip_suffix(".cu */"))
        {
            module = stem.to_string();
        }
        if let Some(rest) = l
            .strip_prefix("QADAPT_KERNEL(")
            .or_else(|| l.strip_prefix("QADAPT_KERNEL_SM90A("))
        {
            let Some(inner) = rest.strip_suffix(");") else {
                continue;
            };
            let mut parts = inner.split(',').map(str::trim);
            let name = parts.next().unwrap().to_string();
            let args = parts.next().expect("QADAPT_KERNEL(name, Args)").to_string();
            assert!(
                !module.is_empty(),
                "{name}: a QADAPT_KERNEL must follow a /* kernels/<file>.cu */ comment"
            );
            decls.push((name, args, module.clone()));
        }
    }
    decls
}

/// Every kernel a .cu defines must be declared in the header, under that file's comment.
fn check_decls_against_sources(
    decls: &[(String, String, String)],
    sources: &[PathBuf],
    stems: &[String],
) {
    for (src, stem) in sources.iter().zip(stems) {
        let text = fs::read_to_string(src).unwrap();
        for line in text.lines() {
            let l = line.trim_start();
            let def = l
                .strip_prefix("QADAPT_KERNEL(")
                .or_else(|| l.strip_prefix("QADAPT_KERNEL_BOUNDED("))
                .or_else(|| l.strip_prefix("QADAPT_KERNEL_SM90A("));
            if let Some(rest) = def {
                let name = rest.split(',').next().unwrap().trim();
                let found = decls.iter().find(|(n, _, _)| n == name);
                match found {
                    Some((_, _, m)) if m == stem => {}
                    Some((_, _, m)) => panic!(
                        "{name} is defined in kernels/{stem}.cu but listed under kernels/{m}.cu in qadapt.h"
                    ),
                    None => panic!(
                        "{name} is defined in kernels/{stem}.cu but not declared in qadapt.h"
                    ),
                }
            }
        }
    }
}

fn write_kernels_rs(
    out: &Path,
    decls: &[(String, String, String)],
    stems: &[String],
    modules: &[(String, PathBuf, PathBuf)],
) {
    let mut s = String::new();
    writeln!(s, "/// Whether nvcc compiled the kernels into this build.").unwrap();
    writeln!(s, "pub const COMPILED: bool = {};", !modules.is_empty()).unwrap();
    let archs: Vec<String> = SASS_ARCHS.iter().map(|a| format!("{a:?}")).collect();
    writeln!(
        s,
        "/// SASS architectures in every fatbin (PTX for `{PTX_ARCH}` rides along)."
    )
    .unwrap();
    writeln!(s, "pub const ARCHS: &[&str] = &[{}];", archs.join(", ")).unwrap();
    writeln!(
        s,
        "/// The SASS architecture of the modules named `*{SM90A_SUFFIX}` (sm_90a kernels, no PTX)."
    )
    .unwrap();
    writeln!(s, "pub const SM90A_ARCHS: &[&str] = &[{SM90A_ARCH:?}];").unwrap();
    writeln!(
        s,
        "/// The suffix of the module names built for [`SM90A_ARCHS`] only."
    )
    .unwrap();
    writeln!(s, "pub const SM90A_SUFFIX: &str = {SM90A_SUFFIX:?};").unwrap();
    writeln!(s, "/// The stems of `kernels/*.cu`.").unwrap();
    let files: Vec<String> = stems.iter().map(|f| format!("{f:?}")).collect();
    writeln!(
        s,
        "pub const KERNEL_FILES: &[&str] = &[{}];",
        files.join(", ")
    )
    .unwrap();
    writeln!(
        s,
        "/// Kernel names, one constant per `QADAPT_KERNEL` in `qadapt.h`."
    )
    .unwrap();
    writeln!(s, "pub mod kernels {{").unwrap();
    writeln!(s, "    use super::KernelName;").unwrap();
    for (name, args, module) in decls {
        writeln!(
            s,
            "    #[doc = \"`{name}({args})` in `kernels/{module}.cu`\"]\n    pub const {}: KernelName = KernelName {{ name: {name:?}, args: {args:?}, module: {module:?} }};",
            name.to_uppercase()
        )
        .unwrap();
    }
    writeln!(s, "}}").unwrap();
    let all: Vec<String> = decls
        .iter()
        .map(|(n, _, _)| format!("kernels::{}", n.to_uppercase()))
        .collect();
    writeln!(s, "/// Every kernel declared in `qadapt.h`.").unwrap();
    writeln!(
        s,
        "pub const KERNELS: &[KernelName] = &[{}];",
        all.join(", ")
    )
    .unwrap();
    writeln!(s, "/// The compiled modules (empty without nvcc).").unwrap();
    writeln!(s, "pub const MODULES: &[Module] = &[").unwrap();
    for (stem, fatbin, report) in modules {
        writeln!(
            s,
            "    Module {{ name: {stem:?}, fatbin: include_bytes!({:?}), ptxas_report: include_str!({:?}) }},",
            fatbin.display().to_string(),
            report.display().to_string()
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    fs::write(out.join("kernels.rs"), s).expect("write kernels.rs");
}
