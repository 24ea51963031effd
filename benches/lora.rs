//! LoRA benches (filled in below).
fn main() {}
