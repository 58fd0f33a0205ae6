//! `ferrynet render` templates: any template text compiles or errors, and renders against a
//! context with services, producers and endpoints (or errors) without panicking.
#![no_main]

use std::sync::OnceLock;

use ferrynet::render::context::{build, RenderContext};
use ferrynet::render::template::Template;
use ferrynet_model::discovery::DiscoveryView;
use libfuzzer_sys::fuzz_target;

fn ctx() -> &'static RenderContext {
    static CTX: OnceLock<RenderContext> = OnceLock::new();
    CTX.get_or_init(|| build(&DiscoveryView::default(), "h1"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Template::new("fuzz", s.to_string()) {
        let _ = t.render(ctx());
    }
});
