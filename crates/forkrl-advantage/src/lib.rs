//! # forkrl-advantage
//!
//! Advantage estimators (GRPO, Dr.GRPO, RLOO), policy losses (PPO-clip with clip-higher and dual-clip, GSPO, CISPO,
//! GMPO, Clip-Cov, KL-Cov), verl's loss-aggregation modes with explicit global denominators, Hölder-mean
//! aggregation, KL estimators, token weighting and cancellation batching.
//!
//! This crate is laid down by the workspace foundation; its methods arrive with the forkrl-advantage issue and are
//! not implemented yet. It exports nothing so far, so nothing here can be mistaken for a working method.
