//! The MCP guard: the cloudlet between AI agents and the Model Context Protocol servers
//! they call. This module holds what does not depend on the transport: the threat checks
//! on tool definitions and results ([`threats`]), per-role tool policy ([`policy`]) and the
//! audit log ([`audit`]).

pub mod audit;
pub mod policy;
pub mod threats;
