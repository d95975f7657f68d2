//! Tasks of the RLVR loop: the built-in generators ([`arithmetic`], [`countdown`]) and JSONL datasets ([`jsonl`]),
//! behind one [`task::Task`] that gives prompts, SFT targets and a verifier per problem ([`verify`]: exact, no code
//! execution).

pub mod arithmetic;
pub mod countdown;
pub mod jsonl;
pub mod task;
pub mod verify;

pub use task::{Gold, Problem, Task, TaskConfig};
