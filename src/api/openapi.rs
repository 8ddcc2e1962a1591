//! The API's OpenAPI 3.1 document, `GET /v1/openapi.json`: written by hand in `openapi.json`
//! next to this file. A test reads the routes of [`super::router`] from its source and fails
//! when one is missing from the document (or the document has one the router lacks): a new
//! route gets its `paths` entry, with its request and response schemas, in the same change.

use axum::http::header;
use axum::response::IntoResponse;

pub const DOCUMENT: &str = include_str!("openapi.json");

pub(super) async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::DOCUMENT;

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    /// `(METHOD, /path)` of every `.route("/path", get(..).post(..))` in the router's source.
    fn routes_in_source(source: &str) -> BTreeSet<(String, String)> {
        let start = source.find("pub fn router(").expect("router() in src/api/mod.rs");
        let body = &source[start..];
        let body = &body[..body.find("\n}\n").unwrap_or(body.len())];
        let mut routes = BTreeSet::new();
        let mut rest = body;
        while let Some(at) = rest.find(".route(") {
            rest = rest[at + ".route(".len()..].trim_start();
            let Some(after_quote) = rest.strip_prefix('"') else { continue };
            rest = after_quote;
            let path_end = rest.find('"').expect("closing quote of a route path");
            let path = rest[..path_end].to_string();
            // The method router: up to the parenthesis that closes `.route(`.
            let mut depth = 1;
            let mut end = path_end;
            for (i, c) in rest.char_indices().skip(path_end) {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            let methods = &rest[path_end..end];
            for m in METHODS {
                // `get(handler)` first or `.get(handler)` chained; a module path (`tokens::create`)
                // inside is not a method.
                let found = methods.match_indices(&format!("{m}(")).any(|(i, _)| {
                    i == 0 || !methods[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                });
                if found {
                    routes.insert((m.to_string(), path.clone()));
                }
            }
            rest = &rest[end..];
        }
        routes
    }

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("src/api/openapi.json is valid JSON")
    }

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let source = include_str!("mod.rs");
        let routes = routes_in_source(source);
        assert!(routes.len() > 10, "found too few routes in the router: {routes:?}");
        let doc = document();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for m in METHODS {
                if item.get(m).is_some() {
                    documented.insert((m.to_string(), path.clone()));
                }
            }
        }
        let missing: Vec<_> = routes.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(missing.is_empty(), "routes missing from src/api/openapi.json: {missing:?}");
        assert!(extra.is_empty(), "src/api/openapi.json documents routes the router lacks: {extra:?}");
    }

    #[test]
    fn every_operation_has_responses_and_refs_resolve() {
        let doc = document();
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for m in METHODS {
                let Some(op) = item.get(m) else { continue };
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{m} {path}: no responses");
                let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{m} {path}: no operationId"));
                assert!(ids.insert(id.to_string()), "operationId {id} used twice");
            }
            // Path parameters are declared.
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(|c| c == '{' || c == '}');
                let declared = item["parameters"].as_array().into_iter().flatten().any(|p| p["name"] == name);
                assert!(declared, "{path}: parameter {name} not declared");
            }
        }
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|x| refs(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        for r in all {
            let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected $ref {r}"));
            assert!(doc["components"]["schemas"].get(name).is_some(), "$ref {r} points nowhere");
        }
    }

    #[test]
    fn the_route_reader_reads_chains_and_module_paths() {
        let source = "pub fn router(sup: S) -> Router {\n    Router::new()\n        \
            .route(\"/a\", get(list).post(create))\n        .route(\n            \"/b/{x}\",\n            \
            delete(tokens::remove),\n        )\n        .route(\"/c\", get(stats::get_all))\n}\n";
        let found: Vec<_> = routes_in_source(source).into_iter().collect();
        let want: Vec<(String, String)> = [("delete", "/b/{x}"), ("get", "/a"), ("get", "/c"), ("post", "/a")]
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(found, want);
    }
}
