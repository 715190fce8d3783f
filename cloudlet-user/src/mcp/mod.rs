//! The MCP guard: the cloudlet between AI agents and the Model Context Protocol servers
//! they call. [`guard`] serves the `/mcp` endpoint on the front door and federates the
//! [`upstream`] servers behind it; callers are identified by bearer JWTs ([`identity`]) and
//! held to per-role tool policy ([`policy`]); tool definitions are pinned ([`pins`]) and
//! scanned with the threat checks ([`threats`]) as are results; every request goes to the
//! audit log ([`audit`]).

pub mod audit;
pub mod config;
pub mod guard;
pub mod http1;
pub mod identity;
pub mod pins;
pub mod policy;
pub mod threats;
pub mod upstream;
