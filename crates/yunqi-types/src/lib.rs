//! Core domain types shared by every yunqi crate: validated names, identities (departments,
//! principals, roles, tokens), the audit event, the error type with its stable codes, the named
//! limits and the clock. This crate does no IO and depends on no other yunqi crate.
#![deny(missing_docs)]

pub mod audit;
pub mod classify;
pub mod clock;
pub mod error;
pub mod grant;
pub mod identity;
pub mod limits;
pub mod mask;
pub mod name;
pub mod suggest;

pub use audit::{AuditEvent, Outcome};
pub use classify::{ColumnClass, Detected};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, ErrorCode, Result};
pub use grant::{Grant, GrantState, GrantStatus};
pub use identity::{Department, NationalId, Principal, Role, TokenInfo};
pub use limits::Limits;
pub use name::Name;
