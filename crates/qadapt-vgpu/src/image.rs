//! What `cuModuleLoadData` needs from an image, and what a launch needs from a kernel.
//!
//! An image is a fatbin (magic 0xBA55ED50: a 16-byte header giving the size of the entries that
//! follow; each entry a header with its kind, 1 = PTX text, 2 = ELF cubin, its target `sm_XY` and
//! its payload size), a bare ELF cubin, or NUL-terminated PTX text. The real driver picks the
//! entry that runs on the device (SASS for sm_90, else PTX for compute_XY <= 90, JIT-compiled); we
//! check that one exists (else CUDA_ERROR_NO_BINARY_FOR_GPU) and take the module's kernels to be
//! the emulated kernels whose name occurs in the image as a symbol (a NUL-terminated string, not
//! the tail of a longer identifier).
//!
//! SASS for sm_90a (`-gencode arch=compute_90a,code=sm_90a`: wgmma, setmaxnreg; the `lora_sm90`
//! module holds nothing else) runs on compute capability 9.0 devices, so it is sm_90 code here.
//! What marks the `a` variant (nvcc 13.0, checked on a build of a one-kernel file): the fatbin
//! entry's flags word (offset 0x28) has bit 20 set ([`FATBIN_FLAG_ARCH_SPECIFIC`]); the cubin's
//! ELF header is the same as sm_90's (e_flags 0x6005a04: ABI version 8, sm 0x5a in bits 8-15), only
//! its `.nv.compat` attributes and the `-arch sm_90a` in `.note.nv.tkinfo` differ. The arch field
//! of both is 90, so the architecture check accepts sm_90a and still refuses every other SASS
//! (sm_80, sm_100a, ...). ptxas reports such kernels as `for 'sm_90a'`; their resources count.
//!
//! A kernel's static shared memory, registers and stack come from ptxas' `-v` report of the real
//! build (`qadapt_kernels::MODULES[..].ptxas_report`, the sm_90 entries), so launch limits are
//! checked against what the compiled kernel really uses. `.maxntid` (`__launch_bounds__`) comes
//! from the PTX in the image.

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::CUresult;

const FATBIN_MAGIC: u32 = 0xBA55_ED50;
/// Bit of a fatbin entry's flags (the u64 at offset 0x28 of its header) that nvcc sets on
/// arch-specific SASS (`sm_90a`).
pub(crate) const FATBIN_FLAG_ARCH_SPECIFIC: u64 = 1 << 20;
/// The device's architecture.
const SM: u32 = 90;

/// What ptxas reported for one kernel on sm_90.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Resources {
    /// Registers per thread.
    pub(crate) regs: u32,
    /// Static shared memory per CTA, bytes.
    pub(crate) smem: u32,
    /// Stack frame per thread, bytes.
    pub(crate) stack: u32,
    /// Constant bank 0 (parameters and driver constants), bytes.
    pub(crate) cmem0: u32,
}

/// Parses a ptxas `-v` report: for every `Compiling entry function 'NAME' for 'sm_90'`, the
/// `Used N registers, ... M bytes smem, ... K bytes cmem[0]` line and the `N bytes stack frame`
/// line that follow it.
pub(crate) fn parse_ptxas_report(report: &str, sm: &str) -> HashMap<String, Resources> {
    let mut out = HashMap::new();
    let mut current: Option<String> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            let target = parts.nth(1).unwrap_or_default();
            current = (target == sm).then_some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        if line.contains("bytes stack frame") {
            let stack = number_before(line, "bytes stack frame").unwrap_or(0);
            out.entry(name.clone())
                .or_insert_with(Resources::default)
                .stack = stack;
        }
        if line.contains("Used ") && line.contains(" registers") {
            let r = out.entry(name.clone()).or_insert_with(Resources::default);
            r.regs = number_before(line, "registers").unwrap_or(0);
            r.smem = number_before(line, "bytes smem").unwrap_or(0);
            r.cmem0 = number_before(line, "bytes cmem[0]").unwrap_or(0);
            current = None;
        }
    }
    out
}

/// The integer right before `marker` in `line` ("Used 32 registers" -> 32 for "registers").
fn number_before(line: &str, marker: &str) -> Option<u32> {
    let at = line.find(marker)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Every kernel of the real build with its sm_90 resources: the `sm_90` entries of ptxas' reports,
/// and the `sm_90a` ones (arch-specific SASS, which also runs on sm_90) for kernels that have no
/// plain sm_90 entry.
pub(crate) static RESOURCES: LazyLock<HashMap<String, Resources>> = LazyLock::new(|| {
    let mut all = HashMap::new();
    for m in qadapt_kernels::MODULES {
        for (k, r) in parse_ptxas_report(m.ptxas_report, "sm_90a") {
            all.entry(k).or_insert(r);
        }
    }
    for m in qadapt_kernels::MODULES {
        all.extend(parse_ptxas_report(m.ptxas_report, "sm_90"));
    }
    all
});

/// A loaded image: its bytes, and which kinds of code it holds.
#[derive(Debug)]
pub(crate) struct Image {
    pub(crate) bytes: Vec<u8>,
    /// PTX texts found in it (fatbin PTX entries, or the image itself).
    pub(crate) ptx: Vec<String>,
}

/// Reads the image at `p` (fatbin, cubin or PTX text), finds its length, and checks that it holds
/// code for sm_90.
///
/// # Safety
/// `p` must point to a complete image as `cuModuleLoadData` requires.
pub(crate) unsafe fn read(p: *const u8) -> Result<Image, CUresult> {
    if p.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: the caller passes an image, which is at least 4 bytes long in every format we
    // accept (an empty PTX string is 1 byte: checked through its first byte only).
    let first = unsafe { *p };
    if first == 0 {
        return Err(CUresult::CUDA_ERROR_INVALID_IMAGE);
    }
    // SAFETY: as above (the caller promises a complete image; every format starts with >= 4 bytes
    // or is text whose first 4 bytes, if shorter, include its NUL: read bytewise up to it).
    let head = unsafe { read_prefix(p, 16) };
    if head.len() >= 16 && u32::from_le_bytes(head[0..4].try_into().unwrap()) == FATBIN_MAGIC {
        let header_size = u16::from_le_bytes(head[6..8].try_into().unwrap()) as usize;
        let fat_size = u64::from_le_bytes(head[8..16].try_into().unwrap()) as usize;
        let total = header_size + fat_size;
        // SAFETY: the fatbin header says the image is `total` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(p, total) }.to_vec();
        let (has_sass, ptx) = fatbin_entries(&bytes[header_size..])?;
        if !has_sass && ptx.is_empty() {
            eprintln!(
                "qadapt-vgpu: cuModuleLoadData: the fatbin holds neither sm_90 SASS nor PTX for \
                 compute_90 or older: CUDA_ERROR_NO_BINARY_FOR_GPU"
            );
            return Err(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU);
        }
        return Ok(Image { bytes, ptx });
    }
    if head.starts_with(b"\x7fELF") {
        // SAFETY: an ELF64 header is 64 bytes.
        let eh = unsafe { std::slice::from_raw_parts(p, 64) };
        let shoff = u64::from_le_bytes(eh[0x28..0x30].try_into().unwrap()) as usize;
        let shentsize = u16::from_le_bytes(eh[0x3a..0x3c].try_into().unwrap()) as usize;
        let shnum = u16::from_le_bytes(eh[0x3c..0x3e].try_into().unwrap()) as usize;
        let arch = elf_sm(eh);
        if arch != SM {
            eprintln!(
                "qadapt-vgpu: cuModuleLoadData: a cubin for sm_{arch} cannot run on sm_90: \
                 CUDA_ERROR_NO_BINARY_FOR_GPU"
            );
            return Err(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU);
        }
        // SAFETY: the section header table ends the ELF file.
        let bytes = unsafe { std::slice::from_raw_parts(p, shoff + shentsize * shnum) }.to_vec();
        return Ok(Image {
            bytes,
            ptx: Vec::new(),
        });
    }
    // PTX text.
    // SAFETY: a PTX image is a NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(p.cast()) }
        .to_string_lossy()
        .into_owned();
    if !text.contains(".version") || !text.contains(".target") {
        return Err(CUresult::CUDA_ERROR_INVALID_IMAGE);
    }
    match ptx_target(&text) {
        Some(t) if t <= SM => {}
        _ => {
            eprintln!(
                "qadapt-vgpu: cuModuleLoadData: PTX for a target newer than sm_90: \
                 CUDA_ERROR_INVALID_PTX"
            );
            return Err(CUresult::CUDA_ERROR_INVALID_PTX);
        }
    }
    let mut bytes = text.clone().into_bytes();
    bytes.push(0);
    Ok(Image {
        bytes,
        ptx: vec![text],
    })
}

/// Up to `n` bytes from `p`, stopping after a NUL within the first 4 (a short text image).
///
/// # Safety
/// `p` must be readable for `n` bytes unless one of its first 4 bytes is NUL.
unsafe fn read_prefix(p: *const u8, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: within the caller's promise.
        let b = unsafe { *p.wrapping_add(i) };
        v.push(b);
        if b == 0 && i < 4 {
            break;
        }
    }
    v
}

/// The `sm_XY` of an ELF cubin: e_flags bits 8..16 in the ABI of CUDA 12.8 and later
/// (EI_ABIVERSION >= 8), bits 0..8 before.
fn elf_sm(eh: &[u8]) -> u32 {
    let flags = u32::from_le_bytes(eh[0x30..0x34].try_into().unwrap());
    if eh[8] >= 8 {
        (flags >> 8) & 0xff
    } else {
        flags & 0xff
    }
}

/// `(has sm_90 SASS, PTX texts for compute_XY <= 90)` of the entries of a fatbin.
fn fatbin_entries(mut rest: &[u8]) -> Result<(bool, Vec<String>), CUresult> {
    let mut has_sass = false;
    let mut ptx = Vec::new();
    while rest.len() >= 0x20 {
        let kind = u16::from_le_bytes(rest[0..2].try_into().unwrap());
        let header = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
        let size = u64::from_le_bytes(rest[8..16].try_into().unwrap()) as usize;
        let arch = u32::from_le_bytes(rest[0x1c..0x20].try_into().unwrap());
        if header < 0x20 || header + size > rest.len() {
            return Err(CUresult::CUDA_ERROR_INVALID_IMAGE);
        }
        let payload = &rest[header..header + size];
        // sm_90a SASS has arch 90 and FATBIN_FLAG_ARCH_SPECIFIC in its flags: it runs on sm_90.
        if kind == 2 && arch == SM && header >= 0x30 && crate::trace() {
            let flags = u64::from_le_bytes(rest[0x28..0x30].try_into().unwrap());
            if flags & FATBIN_FLAG_ARCH_SPECIFIC != 0 {
                eprintln!(
                    "qadapt-vgpu: cuModuleLoadData: sm_90a (arch-specific) SASS, runs on sm_90"
                );
            }
        }
        match kind {
            2 if arch == SM => has_sass = true,
            1 if arch <= SM => {
                // Uncompressed PTX text (qadapt builds with -compress=false); a compressed entry
                // holds no readable `.entry` and only loses the .maxntid check.
                let end = payload
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(payload.len());
                ptx.push(String::from_utf8_lossy(&payload[..end]).into_owned());
            }
            _ => {}
        }
        rest = &rest[header + size..];
    }
    Ok((has_sass, ptx))
}

fn ptx_target(text: &str) -> Option<u32> {
    let t = text.split(".target").nth(1)?;
    let t = t.split_whitespace().next()?;
    let digits: String = t
        .trim_start_matches("sm_")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Whether `name` occurs in `image` as a symbol: followed by NUL, preceded by a byte that cannot
/// continue an identifier.
pub(crate) fn has_symbol(image: &[u8], name: &str) -> bool {
    let needle: Vec<u8> = name.bytes().chain(std::iter::once(0)).collect();
    image.windows(needle.len()).enumerate().any(|(i, w)| {
        w == needle.as_slice()
            && (i == 0 || {
                let b = image[i - 1];
                !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
            })
    })
}

/// `.maxntid` of entry `name` in any of `ptx` (x*y*z), if it declares one.
pub(crate) fn max_threads(ptx: &[String], name: &str) -> Option<u32> {
    for text in ptx {
        let pat = format!(".entry {name}(");
        let Some(at) = text.find(&pat) else { continue };
        let after = &text[at..];
        let body = after.find('{').map_or(after, |b| &after[..b]);
        let directive = body
            .split(".maxntid")
            .nth(1)
            .or_else(|| body.split(".reqntid").nth(1))?;
        let line = directive.lines().next().unwrap_or_default();
        let dims: Vec<u32> = line
            .split(',')
            .filter_map(|d| d.trim().parse().ok())
            .collect();
        return (!dims.is_empty()).then(|| dims.iter().product());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_read_per_target() {
        let r = "ptxas info    : Compiling entry function 'k' for 'sm_80'\n\
                 ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n\
                 ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                 ptxas info    : Function properties for k\n    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                 ptxas info    : Used 38 registers, used 1 barriers, 2048 bytes smem, 408 bytes cmem[0]\n\
                 ptxas info    : Compiling entry function 'j' for 'sm_90'\n\
                 ptxas info    : Used 22 registers, used 0 barriers, 392 bytes cmem[0]\n";
        let m = parse_ptxas_report(r, "sm_90");
        assert_eq!(
            m["k"],
            Resources {
                regs: 38,
                smem: 2048,
                stack: 8,
                cmem0: 408
            }
        );
        assert_eq!(
            m["j"],
            Resources {
                regs: 22,
                smem: 0,
                stack: 0,
                cmem0: 392
            }
        );
    }

    #[test]
    fn sm_90a_report_lines_are_read() {
        let r = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                 ptxas info    : Function properties for k\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                 ptxas info    : Used 168 registers, used 1 barriers, 57 bytes smem\n";
        assert_eq!(parse_ptxas_report(r, "sm_90a")["k"].regs, 168);
        assert!(parse_ptxas_report(r, "sm_90").is_empty());
    }

    /// A fatbin of one SASS entry for `arch` with `flags`, laid out as nvcc 13.0 writes it.
    fn fatbin(arch: u32, flags: u64) -> Vec<u8> {
        let elf = {
            let mut e = vec![0u8; 64];
            e[..4].copy_from_slice(b"\x7fELF");
            e[8] = 8;
            e[0x30..0x34].copy_from_slice(&(0x0600_0004 | (arch << 8)).to_le_bytes());
            e
        };
        let mut entry = vec![0u8; 64];
        entry[0..2].copy_from_slice(&2u16.to_le_bytes());
        entry[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
        entry[4..8].copy_from_slice(&64u32.to_le_bytes());
        entry[8..16].copy_from_slice(&(elf.len() as u64).to_le_bytes());
        entry[0x1c..0x20].copy_from_slice(&arch.to_le_bytes());
        entry[0x28..0x30].copy_from_slice(&flags.to_le_bytes());
        entry.extend_from_slice(&elf);
        let mut out = vec![0u8; 16];
        out[0..4].copy_from_slice(&FATBIN_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&1u16.to_le_bytes());
        out[6..8].copy_from_slice(&16u16.to_le_bytes());
        out[8..16].copy_from_slice(&(entry.len() as u64).to_le_bytes());
        out.extend_from_slice(&entry);
        out
    }

    #[test]
    fn sm_90a_sass_loads_and_other_arch_specific_sass_does_not() {
        let a90 = fatbin(90, 0x11 | FATBIN_FLAG_ARCH_SPECIFIC);
        // SAFETY: a complete fatbin image.
        let img = unsafe { read(a90.as_ptr()) }.expect("sm_90a SASS runs on sm_90");
        assert!(img.ptx.is_empty());
        let plain = fatbin(90, 0x11);
        // SAFETY: as above.
        assert!(unsafe { read(plain.as_ptr()) }.is_ok());
        for other in [
            fatbin(100, 0x11 | FATBIN_FLAG_ARCH_SPECIFIC),
            fatbin(80, 0x11),
        ] {
            // SAFETY: as above.
            let r = unsafe { read(other.as_ptr()) };
            assert!(matches!(r, Err(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU)));
        }
    }

    #[test]
    fn symbols_are_whole_names() {
        let img = b"\0lora_gemm_xa_bf16\0xa_bf16x\0";
        assert!(has_symbol(img, "lora_gemm_xa_bf16"));
        assert!(!has_symbol(img, "xa_bf16"));
        assert!(!has_symbol(img, "gemm_xa_bf16"));
    }

    #[test]
    fn maxntid_is_read_from_the_entry() {
        let ptx = vec![".visible .entry a(\n.param .u64 p\n)\n.maxntid 128, 1, 1\n{\n}\n.visible .entry b(\n)\n{\n}".to_string()];
        assert_eq!(max_threads(&ptx, "a"), Some(128));
        assert_eq!(max_threads(&ptx, "b"), None);
    }
}
