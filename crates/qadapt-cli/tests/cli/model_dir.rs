//! `qadapt quantize` / `dequantize` on whole HF model directories: the tensors are those
//! transformers + bitsandbytes write for the same model (`tests/data/tiny_llama_nf4`, made by
//! `tests/data/make_transformers_nf4.py`), config.json gets the quantization_config transformers
//! reads, sharded checkpoints keep a consistent index, and nothing is overwritten or half-written.

use crate::support::{bin, data, qadapt};
use std::path::Path;

use safetensors::SafeTensors;
use serde_json::Value;

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn quantized_directory_matches_what_transformers_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nf4");
    let r = bin()
        .args([
            "quantize",
            data("tiny_llama").to_str().unwrap(),
            out.to_str().unwrap(),
            "--double-quant",
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let want_bytes = std::fs::read(data("tiny_llama_nf4/model.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    let ours_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let (mut a, mut b) = (ours.names(), want.names());
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same keys as transformers' checkpoint");
    assert!(a.len() > 80);
    for k in a {
        let (x, y) = (ours.tensor(k).unwrap(), want.tensor(k).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{k}");
        assert_eq!(x.data(), y.data(), "{k}");
    }
    let qc = &json(&out.join("config.json"))["quantization_config"];
    let theirs = &json(&data("tiny_llama_nf4/config.json"))["quantization_config"];
    assert_eq!(qc, theirs, "quantization_config");
    // Everything else of config.json is unchanged.
    let mut cfg = json(&out.join("config.json"));
    cfg.as_object_mut().unwrap().remove("quantization_config");
    assert_eq!(cfg, json(&data("tiny_llama/config.json")));
}

#[test]
fn sharded_directory_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (q, back) = (dir.path().join("q"), dir.path().join("back"));
    let src = data("tiny_llama_llama3");
    let r = qadapt(&[Path::new("quantize"), &src, &q]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let index = json(&q.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let mut seen = 0;
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let bytes = std::fs::read(q.join(shard)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for k in st.names() {
            assert_eq!(
                map[k].as_str(),
                Some(shard),
                "{k} is indexed under its shard"
            );
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        map.len(),
        "the index lists exactly the written tensors"
    );
    assert!(
        map.keys()
            .any(|k| k.ends_with(".quant_state.bitsandbytes__nf4"))
    );
    assert!(
        !map.keys()
            .any(|k| k.starts_with("model.embed_tokens.weight.")),
        "embeddings stay dense"
    );

    let r = qadapt(&[Path::new("dequantize"), &q, &back]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        json(&back.join("config.json"))
            .get("quantization_config")
            .is_none()
    );
    let back_index = json(&back.join("model.safetensors.index.json"));
    let orig_index = json(&src.join("model.safetensors.index.json"));
    assert_eq!(
        back_index["weight_map"], orig_index["weight_map"],
        "original keys and shards again"
    );
}

#[test]
fn existing_or_invalid_outputs_are_refused_and_nothing_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    let r = qadapt(&[Path::new("quantize"), &data("tiny_llama"), &out]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("already exists"));

    let not_model = dir.path().join("not_a_model");
    std::fs::create_dir(&not_model).unwrap();
    let r = qadapt(&[Path::new("quantize"), &not_model, &dir.path().join("o")]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("no readable config.json"));

    // A shard that is not safetensors fails the run and removes the partial output directory.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(data("tiny_llama/config.json"), broken.join("config.json")).unwrap();
    std::fs::write(
        broken.join("model.safetensors"),
        b"definitely not a safetensors file",
    )
    .unwrap();
    let o = dir.path().join("o2");
    let r = qadapt(&[Path::new("quantize"), &broken, &o]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("not a safetensors file"));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().contains("partial")),
        "{left:?}"
    );
    assert!(!o.exists());
}
