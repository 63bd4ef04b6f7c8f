//! The console's page, embedded in the binary (no CDN, no build step): plain HTML, CSS and
//! JavaScript in `src/console/static/`.

/// `GET /`.
pub const INDEX_HTML: &str = include_str!("static/index.html");
/// `GET /console.js`.
pub const CONSOLE_JS: &str = include_str!("static/console.js");
/// `GET /console.css`.
pub const CONSOLE_CSS: &str = include_str!("static/console.css");
