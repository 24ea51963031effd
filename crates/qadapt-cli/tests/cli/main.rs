//! The `qadapt` binary's tests, one test binary: each module runs the CLI as a user would
//! (fixtures from `tests/data`, outputs in temporary directories) and checks its files, its
//! numbers against the library or the Python references' golden files, and its errors.

mod support;

mod basics;
mod bounds;
mod crash;
mod generate;
mod logits;
mod merge;
mod model_dir;
mod train;
