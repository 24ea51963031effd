//! The kernels of qadapt as data: nothing here launches anything.
//!
//! `build.rs` compiles every `kernels/*.cu` with nvcc into one fatbin per file (SASS for each
//! architecture in [`ARCHS`], plus PTX for the newest so later GPUs can JIT it), runs bindgen on
//! `kernels/include/qadapt.h`, and lists the kernels declared there. The safe layer (`qadapt`)
//! loads a [`Module`]'s fatbin through cudarc and looks kernels up by [`KernelName`].
//!
//! When nvcc is not found the crate still builds: [`COMPILED`] is `false`, [`MODULES`] is empty and
//! the CUDA device reports that it was not compiled. `QADAPT_REQUIRE_CUDA=1` turns a missing nvcc
//! or a kernel that fails to compile into a build error.

/// Raw bindings to `kernels/include/qadapt.h`: argument structs and constants.
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod ffi {
    include!(concat!(env!("OUT_DIR"), "/ffi.rs"));
}

/// The name of a kernel entry point, as declared by `QADAPT_KERNEL(name, Args)` in `qadapt.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelName {
    /// The symbol name of the `extern "C" __global__` function.
    pub name: &'static str,
    /// The argument struct it takes by value (a type in [`ffi`]).
    pub args: &'static str,
    /// The `.cu` file (stem) that defines it, which is also the module holding it.
    pub module: &'static str,
}

/// One compiled kernel file: `kernels/<name>.cu` as a fatbin.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// The file stem, e.g. `nf4`.
    pub name: &'static str,
    /// The fatbin image (SASS for every arch in [`ARCHS`] plus PTX), ready for `cuModuleLoadData`.
    pub fatbin: &'static [u8],
    /// What ptxas printed with `-v` (registers, spills, shared memory per kernel and arch).
    pub ptxas_report: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

impl Module {
    /// The compiled module that defines `kernel`, if the kernels were compiled.
    pub fn containing(kernel: KernelName) -> Option<&'static Module> {
        MODULES.iter().find(|m| m.name == kernel.module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_belongs_to_a_known_module_file() {
        assert!(!KERNELS.is_empty());
        for k in KERNELS {
            assert!(
                KERNEL_FILES.contains(&k.module),
                "{} is declared for module {} which has no kernels/{}.cu",
                k.name,
                k.module,
                k.module
            );
        }
    }

    #[test]
    fn compiled_modules_contain_every_declared_kernel() {
        if !COMPILED {
            assert!(MODULES.is_empty());
            return;
        }
        assert_eq!(MODULES.len(), KERNEL_FILES.len());
        for k in KERNELS {
            let m = Module::containing(*k).expect("module compiled");
            // The ELF symbol table of each SASS image holds the entry name as a C string.
            let needle = format!("{}\0", k.name);
            assert!(
                m.fatbin
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes()),
                "kernel {} not found in the fatbin of {}",
                k.name,
                m.name
            );
            assert!(
                m.ptxas_report.contains(&format!("'{}'", k.name)),
                "ptxas report has no entry for {}",
                k.name
            );
        }
    }
}
