//! The training crate's integration tests, one binary (`cargo test -p qadapt-train --test suite`;
//! a file's tests alone: `... --test suite peft::`). Each module is one file of this folder; a new
//! test file must be listed here, since `autotests = false` keeps cargo from building each file
//! as a binary of its own (each of which linked the whole workspace).

mod common;

mod bounds;
mod cuda_path;
mod generate;
mod golden;
mod gradcheck;
mod loading;
mod lora;
mod lora_dropout;
mod lora_set;
mod memory_plan;
mod merge;
mod methods_gradcheck;
mod peft;
mod surgical;
mod training;
