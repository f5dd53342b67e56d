//! Session tokens: one-time rotating tokens carrying JSON metadata (HaKr/token_server's model,
//! with reuse detection, lifetimes and bounded metadata).

pub mod meta;
pub mod rotation;
pub mod token;

pub use meta::{MetaError, MetaLimits, MetaUpdate};
pub use rotation::{
    decide, live_rotation, replay_answer, successor_record, Decision, Invalid, RotateOutcome, RotateRequest, Rotated,
    RotationPolicy, SessionRecord,
};
pub use token::{ChainId, SealedSuccessor, SessionToken, TokenHash};
