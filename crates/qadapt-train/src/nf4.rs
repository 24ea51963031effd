//! The QLoRA-style base: the seven projection weights of every decoder layer quantized to NF4
//! (block 64, double quantization: bitsandbytes' layout and codes, via [`qadapt::nf4`]) and the
//! model run on their dequantized f32 values. Embeddings, norms and the head stay as they are,
//! as transformers' `load_in_4bit` leaves them.
//!
//! A checkpoint that transformers saved with bitsandbytes 4-bit already holds the codes: the
//! loader keeps them ([`crate::LlamaDir::nf4`]) next to their dequantized values, and
//! [`quantize_projections`] leaves those projections as they are. Quantizing the dequantized
//! values again would not give them back (the block absmax would be double-quantized a second
//! time), so the codes the checkpoint stores are the ones every path runs on: the CPU model
//! through their dequantized values, the CUDA path ([`crate::cuda`]) on the codes themselves.

use qadapt::nf4::{DEFAULT_BLOCKSIZE, Nf4Tensor, Statistics};
use qadapt::{DType, Device, FloatVec, Result};

use crate::config::LlamaConfig;
use crate::invalid;
use crate::weights::{LlamaWeights, Proj};

/// The NF4 codes of a model's projections, by layer and [`Proj::index`]; a projection without
/// codes is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Nf4Projections {
    layers: Vec<Vec<Option<Nf4Tensor>>>,
}

impl Nf4Projections {
    /// No codes, for a model of `layers` decoder layers.
    pub fn none(layers: usize) -> Self {
        Nf4Projections {
            layers: vec![vec![None; Proj::ALL.len()]; layers],
        }
    }

    /// The codes of projection `p` of layer `layer`, if it has them.
    pub fn get(&self, layer: usize, p: Proj) -> Option<&Nf4Tensor> {
        self.layers.get(layer)?.get(p.index())?.as_ref()
    }

    /// Sets the codes of projection `p` of layer `layer` (layers are added as needed).
    pub fn set(&mut self, layer: usize, p: Proj, t: Nf4Tensor) {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, vec![None; Proj::ALL.len()]);
        }
        self.layers[layer][p.index()] = Some(t);
    }

    /// How many projections have codes.
    pub fn count(&self) -> usize {
        self.layers.iter().flatten().filter(|t| t.is_some()).count()
    }
}

/// Quantizes one `[out, in]` weight (block `blocksize`, double quant).
pub fn quantize(w: &[f32], shape: [usize; 2], blocksize: usize) -> Result<Nf4Tensor> {
    Nf4Tensor::quantize(
        &Device::Cpu,
        &FloatVec::F32(w.to_vec()),
        &shape,
        blocksize,
        Statistics::DoubleQuant,
    )
}

/// The f32 values of `q`.
pub fn dequantize(q: &Nf4Tensor) -> Result<Vec<f32>> {
    match q.dequantize(&Device::Cpu, DType::F32)? {
        FloatVec::F32(v) => Ok(v),
        _ => Err(invalid("nf4 dequantize", "dequantize gave another dtype")),
    }
}

/// Makes `w`'s projections the QLoRA base and returns the codes of all of them. A projection
/// `stored` has codes for (a bitsandbytes checkpoint's own, whose dequantized values `w` already
/// holds) keeps them and its values; every other is quantized (block 64, double quant) and
/// replaced by its dequantized values.
pub fn quantize_projections(
    w: &mut LlamaWeights<f32>,
    cfg: &LlamaConfig,
    stored: &Nf4Projections,
) -> Result<Nf4Projections> {
    let mut codes = Nf4Projections::none(w.layers.len());
    for (l, layer) in w.layers.iter_mut().enumerate() {
        for p in Proj::ALL {
            let q = match stored.get(l, p) {
                Some(q) => q.clone(),
                None => {
                    let (inp, out) = p.dims(cfg);
                    let q = quantize(layer.proj(p), [out, inp], DEFAULT_BLOCKSIZE)?;
                    layer.proj_mut(p).copy_from_slice(&dequantize(&q)?);
                    q
                }
            };
            codes.set(l, p, q);
        }
    }
    Ok(codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_round_trip_error_is_within_half_the_widest_code_gap() {
        let w: Vec<f32> = (0..4096)
            .map(|i| ((i as f32) * 0.731).sin() * 0.3)
            .collect();
        let back = dequantize(&quantize(&w, [64, 64], DEFAULT_BLOCKSIZE).unwrap()).unwrap();
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
