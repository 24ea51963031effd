//! The on-disk layout of bitsandbytes 4-bit weights (placeholder, filled below).
