//! `ferrynet render`: templates over the discovery view, written to files when their content
//! changes, then a reload command (the confd / consul-template job). The pure parts (context,
//! env files, templates, the change decision) are apart from the file writes and the watch loop.

pub mod context;
pub mod envfile;
pub mod output;
pub mod template;
pub mod watch;
