//! # forkrl-rollout
//!
//! Rollout allocation (uniform, HORA, DAPO dynamic sampling), decoding operators (temperature, top-k, top-p,
//! two-temperature, CUTS / Mixed-CUTS), overlong shaping and unbiased pass@k.
//!
//! This crate is laid down by the workspace foundation; its methods arrive with the forkrl-rollout issue and are not
//! implemented yet. It exports nothing so far, so nothing here can be mistaken for a working method.
