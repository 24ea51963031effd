//! NF4 launches: quantize, double quant, dequantize (`kernels/nf4.cu`).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use qadapt_kernels::{KernelName, ffi, kernels};

use super::{aligned16, launch, on_device};
use crate::cuda::CudaDevice;
use crate::dtype::{DType, Float};
use crate::error::{Result, invalid, shape_err};
use crate::nf4::{check_blocksize, num_blocks, packed_len};
use crate::plan;

fn quantize_kernel(d: DType) -> KernelName {
    match d {
        DType::F32 => kernels::NF4_QUANTIZE_F32,
        DType::BF16 => kernels::NF4_QUANTIZE_BF16,
        DType::F16 => kernels::NF4_QUANTIZE_F16,
    }
}

fn dequantize_kernel(d: DType) -> KernelName {
    match d {
        DType::F32 => kernels::NF4_DEQUANTIZE_F32,
        DType::BF16 => kernels::NF4_DEQUANTIZE_BF16,
        DType::F16 => kernels::NF4_DEQUANTIZE_F16,
    }
}

/// The checks both directions share: a supported block size, a non-empty tensor of `n` values
/// and `ceil(n/2)` bytes of codes.
fn check_codes(op: &'static str, n: usize, blocksize: usize, packed: &CudaSlice<u8>) -> Result<()> {
    check_blocksize(op, blocksize)?;
    if n == 0 {
        return Err(invalid(op, "empty tensor"));
    }
    if packed.len() != packed_len(n) {
        return Err(shape_err(
            op,
            format!("packed of {} bytes", packed_len(n)),
            packed.len(),
        ));
    }
    Ok(())
}

/// `nf4_quantize_T`: overwrites `packed[ceil(n/2)]` and `absmax[ceil(n/bs)]` from `input[n]`.
pub(crate) fn nf4_quantize<T: Float>(
    dev: &CudaDevice,
    input: &CudaSlice<T>,
    blocksize: usize,
    packed: &mut CudaSlice<u8>,
    absmax: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "nf4 quantize (cuda)";
    let n = input.len();
    check_codes(OP, n, blocksize, packed)?;
    if absmax.len() != num_blocks(n, blocksize) {
        return Err(shape_err(
            OP,
            format!("{} absmax", num_blocks(n, blocksize)),
            absmax.len(),
        ));
    }
    on_device(OP, dev, "input", input)?;
    on_device(OP, dev, "packed", packed)?;
    on_device(OP, dev, "absmax", absmax)?;
    let plan = plan::nf4_quantize(n as u64, blocksize as u32, &dev.props())?;
    let stream = dev.stream().clone();
    let (input_ptr, _r) = input.device_ptr(&stream);
    let (packed_ptr, _w1) = packed.device_ptr_mut(&stream);
    let (absmax_ptr, _w2) = absmax.device_ptr_mut(&stream);
    let args = ffi::QadaptNf4QuantizeArgs {
        input: input_ptr,
        packed: packed_ptr,
        absmax: absmax_ptr,
        n: n as u64,
        blocksize: blocksize as u32,
        reserved: 0,
    };
    // SAFETY: QadaptNf4QuantizeArgs is what nf4_quantize_T takes; input holds n elements of T,
    // packed ceil(n/2) bytes and absmax ceil(n/bs) floats (all checked above, all on this device);
    // bs is a power of two in [32, 4096]; the kernel writes only inside those bounds.
    unsafe { launch(dev, quantize_kernel(T::DTYPE), plan, &args) }
}

/// The two `nf4_dq_*` kernels: overwrites `codes[nblocks]`, `nested_absmax[ceil(nblocks/256)]`
/// and returns the offset (one 4-byte copy back to the host, which synchronizes the stream).
pub(crate) fn nf4_double_quant(
    dev: &CudaDevice,
    absmax: &CudaSlice<f32>,
    map: &CudaSlice<f32>,
    codes: &mut CudaSlice<u8>,
    nested_absmax: &mut CudaSlice<f32>,
) -> Result<f32> {
    const OP: &str = "nf4 double quant (cuda)";
    let nblocks = absmax.len();
    if nblocks == 0 {
        return Err(invalid(OP, "no blocks"));
    }
    if map.len() != 256 {
        return Err(shape_err(OP, "a 256-entry map", map.len()));
    }
    if codes.len() != nblocks {
        return Err(shape_err(OP, format!("{nblocks} codes"), codes.len()));
    }
    let nn = nblocks.div_ceil(ffi::QADAPT_DQ_BLOCK as usize);
    if nested_absmax.len() != nn {
        return Err(shape_err(
            OP,
            format!("{nn} nested absmax"),
            nested_absmax.len(),
        ));
    }
    on_device(OP, dev, "absmax", absmax)?;
    on_device(OP, dev, "map", map)?;
    on_device(OP, dev, "codes", codes)?;
    on_device(OP, dev, "nested_absmax", nested_absmax)?;
    let plans = plan::nf4_double_quant(nblocks as u64, &dev.props())?;
    let mut offset = dev.zeros::<f32>(1)?;
    {
        let stream = dev.stream().clone();
        let (absmax_ptr, _r1) = absmax.device_ptr(&stream);
        let (map_ptr, _r2) = map.device_ptr(&stream);
        let (offset_ptr, _w2) = offset.device_ptr_mut(&stream);
        let (codes_ptr, _w3) = codes.device_ptr_mut(&stream);
        let (nested_ptr, _w4) = nested_absmax.device_ptr_mut(&stream);
        let args = ffi::QadaptNf4DoubleQuantArgs {
            absmax: absmax_ptr,
            offset: offset_ptr,
            dynamic_map: map_ptr,
            codes: codes_ptr,
            nested_absmax: nested_ptr,
            nblocks: nblocks as u64,
        };
        let stages = [kernels::NF4_DQ_OFFSET, kernels::NF4_DQ_ENCODE];
        for (k, p) in stages.into_iter().zip(plans) {
            // SAFETY: QadaptNf4DoubleQuantArgs is what both nf4_dq_* kernels take; absmax and
            // codes hold nblocks elements, nested_absmax ceil(nblocks/256) floats, map 256
            // floats, offset 1 float, all checked or allocated above on this device; the offset
            // plan is one warp and the encode plan exactly 256 threads per CTA, as the kernels
            // index by threadIdx.x.
            unsafe { launch(dev, k, p, &args) }?;
        }
    }
    Ok(dev.download(&offset)?[0])
}

/// Block scales of an NF4 tensor on the device, borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CudaScalesRef<'a> {
    Absmax(&'a CudaSlice<f32>),
    Double {
        codes: &'a CudaSlice<u8>,
        nested_absmax: &'a CudaSlice<f32>,
        map: &'a CudaSlice<f32>,
        offset: f32,
    },
}

impl CudaScalesRef<'_> {
    /// Checks that the scales cover `nblocks` NF4 blocks and live on `dev`.
    pub(crate) fn check(&self, op: &'static str, dev: &CudaDevice, nblocks: usize) -> Result<()> {
        match *self {
            CudaScalesRef::Absmax(a) => {
                if a.len() != nblocks {
                    return Err(shape_err(op, format!("{nblocks} absmax"), a.len()));
                }
                on_device(op, dev, "absmax", a)
            }
            CudaScalesRef::Double {
                codes,
                nested_absmax,
                map,
                ..
            } => {
                let nn = nblocks.div_ceil(ffi::QADAPT_DQ_BLOCK as usize);
                if codes.len() != nblocks || nested_absmax.len() != nn || map.len() != 256 {
                    return Err(shape_err(
                        op,
                        format!("{nblocks} codes, {nn} nested absmax, 256 map entries"),
                        format!("{}, {}, {}", codes.len(), nested_absmax.len(), map.len()),
                    ));
                }
                on_device(op, dev, "absmax codes", codes)?;
                on_device(op, dev, "nested absmax", nested_absmax)?;
                on_device(op, dev, "map", map)
            }
        }
    }
}

/// `nf4_dequantize_T`: overwrites `out[n]`.
pub(crate) fn nf4_dequantize<T: Float>(
    dev: &CudaDevice,
    packed: &CudaSlice<u8>,
    scales: CudaScalesRef<'_>,
    blocksize: usize,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    const OP: &str = "nf4 dequantize (cuda)";
    let n = out.len();
    check_codes(OP, n, blocksize, packed)?;
    let nblocks = num_blocks(n, blocksize);
    on_device(OP, dev, "packed", packed)?;
    on_device(OP, dev, "out", out)?;
    let plan = plan::nf4_dequantize(n as u64, &dev.props())?;
    let stream = dev.stream().clone();
    let (packed_ptr, _r1) = packed.device_ptr(&stream);
    let (out_ptr, _w) = out.device_ptr_mut(&stream);
    aligned16(OP, "packed", packed_ptr)?;
    aligned16(OP, "out", out_ptr)?;
    let mut args = ffi::QadaptNf4DequantizeArgs {
        packed: packed_ptr,
        out: out_ptr,
        n: n as u64,
        blocksize: blocksize as u32,
        ..Default::default()
    };
    scales.check(OP, dev, nblocks)?;
    let _guards = match scales {
        CudaScalesRef::Absmax(a) => {
            let (p, g) = a.device_ptr(&stream);
            args.absmax = p;
            vec![g]
        }
        CudaScalesRef::Double {
            codes,
            nested_absmax,
            map,
            offset,
        } => {
            let (c, g1) = codes.device_ptr(&stream);
            let (na, g2) = nested_absmax.device_ptr(&stream);
            let (m, g3) = map.device_ptr(&stream);
            args.absmax_codes = c;
            args.nested_absmax = na;
            args.dynamic_map = m;
            args.offset = offset;
            vec![g1, g2, g3]
        }
    };
    // SAFETY: QadaptNf4DequantizeArgs is what nf4_dequantize_T takes; out holds n elements of T
    // and packed ceil(n/2) bytes, both 16-byte aligned for the kernel's 16-byte accesses (its
    // full-group path reads packed[16g..16g+16] and writes out[32g..32g+32] only when 32g+32 <= n,
    // which also keeps the packed read in bounds); the scales cover ceil(n/bs) blocks (checked);
    // every buffer is on this device.
    unsafe { launch(dev, dequantize_kernel(T::DTYPE), plan, &args) }
}
