//! `ferrynet render` templates: any template text compiles or errors, and renders against a
//! context with services, producers and endpoints (or errors) without panicking.
use std::sync::OnceLock;

use ferrynet::render::context::{build, RenderContext};
use ferrynet::render::template::Template;
use ferrynet_model::discovery::DiscoveryView;

fn ctx() -> &'static RenderContext {
    static CTX: OnceLock<RenderContext> = OnceLock::new();
    CTX.get_or_init(|| build(&DiscoveryView::default(), "h1"))
}

/// One input: an error or a value, never a panic (nor a broken invariant).
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Template::new("fuzz", s.to_string()) {
        let _ = t.render(ctx());
    }
}
