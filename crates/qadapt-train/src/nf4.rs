//! The QLoRA-style base: the seven projection weights of every decoder layer quantized to NF4
//! (block 64, double quantization: bitsandbytes' layout and codes, via [`qadapt::nf4`]) and the
//! model run on their dequantized f32 values. Embeddings, norms and the head stay as they are,
//! as transformers' `load_in_4bit` leaves them.

use qadapt::nf4::{DEFAULT_BLOCKSIZE, Nf4Tensor, Statistics};
use qadapt::{DType, Device, FloatVec, Result};

use crate::config::LlamaConfig;
use crate::invalid;
use crate::weights::{LlamaWeights, Proj};

/// Quantizes one `[out, in]` weight and returns its dequantized f32 values.
pub fn round_trip(w: &[f32], shape: [usize; 2], blocksize: usize) -> Result<Vec<f32>> {
    let q = Nf4Tensor::quantize(
        &Device::Cpu,
        &FloatVec::F32(w.to_vec()),
        &shape,
        blocksize,
        Statistics::DoubleQuant,
    )?;
    match q.dequantize(&Device::Cpu, DType::F32)? {
        FloatVec::F32(v) => Ok(v),
        _ => Err(invalid("nf4 round trip", "dequantize gave another dtype")),
    }
}

/// Replaces every projection weight by its NF4 (block 64, double quant) round trip.
pub fn quantize_projections(w: &mut LlamaWeights<f32>, cfg: &LlamaConfig) -> Result<()> {
    for layer in &mut w.layers {
        for p in Proj::ALL {
            let (inp, out) = p.dims(cfg);
            let v = round_trip(layer.proj(p), [out, inp], DEFAULT_BLOCKSIZE)?;
            layer.proj_mut(p).copy_from_slice(&v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_the_widest_code_gap() {
        let w: Vec<f32> = (0..4096)
            .map(|i| ((i as f32) * 0.731).sin() * 0.3)
            .collect();
        let back = round_trip(&w, [64, 64], DEFAULT_BLOCKSIZE).unwrap();
        let mut worst = 0f32;
        for (wb, bb) in w.chunks(64).zip(back.chunks(64)) {
            let absmax = wb.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in wb.iter().zip(bb) {
                worst = worst.max((a - b).abs() / absmax);
            }
        }
        // Widest gap of the NF4 table: 1.0 - 0.7229568 = 0.277, so 0.139 of the block absmax
        // with exact scales; the 8-bit double quantization of the absmax adds its own error
        // (measured 0.152 here). A wrong nibble order or scale gives errors near 1.
        assert!(worst > 0.0 && worst <= 0.17, "{worst}");
    }
}
