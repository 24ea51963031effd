//! Bodies of the fuzz targets: each takes arbitrary bytes, hands them to one loader of untrusted
//! files the way the `qadapt` binary does, and returns. A panic, an abort (an allocation sized by
//! the input that fails) or a sanitizer report is a finding; an `Err` is the expected outcome for
//! nearly every input. Compiled by the cargo-fuzz crate beside this file and by the workspace's
//! `tests/fuzz_corpus.rs`, which replays the committed corpus in `just test`.

#![allow(dead_code)]

use std::path::Path;

/// Splits one input into two files: a little-endian u16 length, that many bytes, the rest. An
/// input too short for its length gives everything to the first file.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    if n <= rest.len() {
        rest.split_at(n)
    } else {
        (rest, &[])
    }
}

/// The base model the adapter target loads against (`tests/data/tiny_llama`'s config).
const BASE_CONFIG: &str = include_str!("../data/tiny_llama/config.json");

/// A safetensors file with bitsandbytes 4-bit tensors, as `qadapt dequantize` reads it: the
/// header, every quant state, the codes, and the dequantized values.
pub(crate) fn safetensors_nf4(data: &[u8]) {
    let Ok(st) = safetensors::SafeTensors::deserialize(data) else {
        return;
    };
    for name in qadapt::nf4::bnb::quantized_names(&st) {
        if let Ok(t) = qadapt::nf4::bnb::decode(&st, Path::new("fuzz.safetensors"), &name) {
            let _ = t.dequantize(&qadapt::Device::Cpu, qadapt::DType::F32);
        }
    }
}

/// A model directory: `config.json` and `model.safetensors` from one input, opened as every
/// command opens one (config checks, weight shapes, 4-bit checkpoints), then the model built.
pub(crate) fn model_dir(data: &[u8]) {
    let (config, weights) = split(data);
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("config.json"), config).expect("writing the config");
    std::fs::write(dir.path().join("model.safetensors"), weights).expect("writing the weights");
    if let Ok(d) = qadapt_train::LlamaDir::open(dir.path()) {
        let _ = d.model();
    }
}

/// A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) loaded against
/// the tiny Llama's config, as `logits`, `merge` and `generate` load one.
pub(crate) fn adapter(data: &[u8]) {
    let (config, tensors) = split(data);
    let base = qadapt_train::LlamaConfig::from_json(BASE_CONFIG, Path::new("config.json"))
        .expect("the base config parses");
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("adapter_config.json"), config).expect("writing the config");
    std::fs::write(dir.path().join("adapter_model.safetensors"), tensors)
        .expect("writing the tensors");
    let _ = qadapt_train::peft::load(dir.path(), &base);
}

/// Training data (JSONL or plain text), read leniently and strictly.
pub(crate) fn jsonl(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for strictness in [
        qadapt_train::dataset::Strictness::Skip,
        qadapt_train::dataset::Strictness::Strict,
    ] {
        let _ = qadapt_train::dataset::parse(Path::new("fuzz.jsonl"), &text, strictness);
    }
}
