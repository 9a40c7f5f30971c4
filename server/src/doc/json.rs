//! Read side, beside data-flow step 3: a document's root types as JSON and their kinds, built
//! from a decoded copy of its state (never the owner's document) for `GET …/json` and the
//! inspector.
//!
//! The server never names a root type: it applies clients' updates, so every root of its
//! documents is untyped ("undefined" in yrs) and only its content says what a client made it.
//! [`Roots::decode`] infers each kind the way yrs does (text if its first live item is text,
//! a map if it has keys, else an array) and goes one step further for XML: an array whose
//! items are XML nodes is an XML fragment (y-prosemirror, Tiptap, BlockNote). Content cannot
//! settle every case (a text whose every character was deleted looks like an empty array; an
//! empty root looks like nothing), so a caller that knows its schema names kinds
//! ([`Kind::parse`], the `types` query parameter) and those win.

use serde_json::{Map as JsonMap, Value, json};
use std::collections::HashMap;
use yrs::types::AsPrelim;
use yrs::types::text::YChange;
use yrs::types::xml::{XmlFragment, XmlOut};
use yrs::updates::decoder::Decode;
use yrs::{
    Any, Array, ArrayRef, Doc, GetString, In, Map, MapRef, OffsetKind, Options, Out, ReadTxn, Text,
    TextRef, Transact, Update, Xml, XmlElementRef, XmlFragmentRef, XmlTextRef,
};

/// What a root type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Map,
    Array,
    XmlFragment,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Map => "map",
            Kind::Array => "array",
            Kind::XmlFragment => "xml",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "text" => Kind::Text,
            "map" => Kind::Map,
            "array" => Kind::Array,
            "xml" | "xml_fragment" | "xmlfragment" => Kind::XmlFragment,
            _ => return None,
        })
    }
}

/// How text (root, nested and inside XML) is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextAs {
    /// The characters only.
    #[default]
    String,
    /// A Quill-style delta: `[{"insert": "...", "attributes": {...}}]`, embeds and formatting kept.
    Delta,
}

/// One root type of a decoded document.
#[derive(Debug, Clone)]
pub struct Root {
    pub name: String,
    pub kind: Kind,
    /// Characters (UTF-16 code units, as JavaScript counts them), map keys, array items or
    /// top-level XML nodes.
    pub len: u32,
}

/// A decoded copy of a document with every root typed.
pub struct Roots {
    doc: Doc,
    pub roots: Vec<Root>,
    /// The roots' refs, in the order of `roots`.
    refs: Vec<RootRef>,
}

impl Roots {
    /// Decodes `state` (a yrs v1 update of the whole document) and types its roots: `hints`
    /// first, inferred from content otherwise. Costs a full decode: callers bound how many run.
    pub fn decode(state: &[u8], hints: &HashMap<String, Kind>) -> Result<Roots, String> {
        let doc = Doc::with_options(Options {
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let update = Update::decode_v1(state).map_err(|e| format!("state does not decode: {e}"))?;
        doc.transact_mut()
            .apply_update(update)
            .map_err(|e| format!("state does not apply: {e}"))?;
        let mut typed: Vec<(String, Kind)> = {
            let txn = doc.transact();
            txn.root_refs()
                .map(|(name, out)| {
                    let kind = hints
                        .get(name)
                        .copied()
                        .unwrap_or_else(|| kind_of(&out, &txn));
                    (name.to_owned(), kind)
                })
                .collect()
        };
        typed.sort_by(|a, b| a.0.cmp(&b.0));
        let mut roots = Vec::with_capacity(typed.len());
        let mut refs = Vec::with_capacity(typed.len());
        for (name, kind) in typed {
            // Typing an untyped root is what `get_or_insert_*` does to a root it finds; on
            // this throwaway copy it only changes how the content is read. (Each takes a
            // write transaction: no read transaction may be open meanwhile.)
            let root = match kind {
                Kind::Text => RootRef::Text(doc.get_or_insert_text(name.as_str())),
                Kind::Map => RootRef::Map(doc.get_or_insert_map(name.as_str())),
                Kind::Array => RootRef::Array(doc.get_or_insert_array(name.as_str())),
                Kind::XmlFragment => RootRef::Xml(doc.get_or_insert_xml_fragment(name.as_str())),
            };
            let txn = doc.transact();
            let len = match &root {
                RootRef::Text(t) => t.len(&txn),
                RootRef::Map(m) => m.len(&txn),
                RootRef::Array(a) => a.len(&txn),
                RootRef::Xml(x) => x.len(&txn),
            };
            roots.push(Root { name, kind, len });
            refs.push(root);
        }
        Ok(Roots { doc, roots, refs })
    }

    /// Every root as JSON, by name.
    pub fn to_json(&self, text: TextAs) -> Value {
        let txn = self.doc.transact();
        let mut out = JsonMap::new();
        for (root, r) in self.roots.iter().zip(&self.refs) {
            let value = match r {
                RootRef::Text(t) => text_json(t, &txn, text),
                RootRef::Map(m) => map_json(m, &txn, text),
                RootRef::Array(a) => array_json(a, &txn, text),
                RootRef::Xml(x) => fragment_json(x, &txn, text),
            };
            out.insert(root.name.clone(), value);
        }
        Value::Object(out)
    }
}

/// A typed root of the decoded copy.
enum RootRef {
    Text(TextRef),
    Map(MapRef),
    Array(ArrayRef),
    Xml(XmlFragmentRef),
}

/// The kind an untyped root's content suggests (see the module doc).
fn kind_of<T: ReadTxn>(out: &Out, txn: &T) -> Kind {
    match out {
        Out::YText(_) | Out::YXmlText(_) => Kind::Text,
        Out::YMap(_) => Kind::Map,
        Out::YArray(_) => Kind::Array,
        Out::YXmlFragment(_) | Out::YXmlElement(_) => Kind::XmlFragment,
        Out::UndefinedRef(_) => match out.as_prelim(txn) {
            In::Text(_) | In::XmlText(_) => Kind::Text,
            In::Array(items)
                if items.iter().any(|i| {
                    matches!(i, In::XmlElement(_) | In::XmlText(_) | In::XmlFragment(_))
                }) =>
            {
                Kind::XmlFragment
            }
            In::Array(_) => Kind::Array,
            In::XmlElement(_) | In::XmlFragment(_) => Kind::XmlFragment,
            _ => Kind::Map,
        },
        _ => Kind::Map,
    }
}

fn value_json<T: ReadTxn>(out: Out, txn: &T, text: TextAs) -> Value {
    match out {
        Out::Any(any) => any_json(&any),
        Out::YText(t) => text_json(&t, txn, text),
        Out::YMap(m) => map_json(&m, txn, text),
        Out::YArray(a) => array_json(&a, txn, text),
        Out::YXmlElement(x) => xml_json(XmlOut::Element(x), txn, text),
        Out::YXmlFragment(x) => xml_json(XmlOut::Fragment(x), txn, text),
        Out::YXmlText(x) => xml_json(XmlOut::Text(x), txn, text),
        Out::YDoc(d) => json!({ "guid": d.guid().as_ref() }),
        _ => Value::Null,
    }
}

/// `Any` as JSON: binary as an array of byte values (what `serde` makes of bytes), undefined
/// as null.
fn any_json(any: &Any) -> Value {
    serde_json::to_value(any).unwrap_or(Value::Null)
}

fn text_json<T: ReadTxn>(t: &TextRef, txn: &T, text: TextAs) -> Value {
    match text {
        TextAs::String => Value::String(t.get_string(txn)),
        TextAs::Delta => delta_json(t.diff(txn, YChange::identity), txn),
    }
}

fn delta_json<T: ReadTxn>(diff: Vec<yrs::types::text::Diff<YChange>>, txn: &T) -> Value {
    Value::Array(
        diff.into_iter()
            .map(|d| {
                let mut op = JsonMap::new();
                op.insert("insert".into(), value_json(d.insert, txn, TextAs::Delta));
                if let Some(attrs) = d.attributes {
                    let attrs = attrs
                        .iter()
                        .map(|(k, v)| (k.to_string(), any_json(v)))
                        .collect();
                    op.insert("attributes".into(), Value::Object(attrs));
                }
                Value::Object(op)
            })
            .collect(),
    )
}

fn map_json<T: ReadTxn>(m: &MapRef, txn: &T, text: TextAs) -> Value {
    let mut entries: Vec<(String, Value)> = m
        .iter(txn)
        .map(|(k, v)| (k.to_owned(), value_json(v, txn, text)))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(entries.into_iter().collect())
}

fn array_json<T: ReadTxn>(a: &ArrayRef, txn: &T, text: TextAs) -> Value {
    Value::Array(a.iter(txn).map(|v| value_json(v, txn, text)).collect())
}

/// XML as a tree: elements `{"nodeName", "attributes", "children"}`, text nodes as text (a
/// string, or a delta keeping inline formatting), nested fragments as their children.
fn xml_json<T: ReadTxn>(node: XmlOut, txn: &T, text: TextAs) -> Value {
    match node {
        XmlOut::Element(e) => element_json(&e, txn, text),
        XmlOut::Fragment(f) => fragment_json(&f, txn, text),
        XmlOut::Text(t) => xml_text_json(&t, txn, text),
    }
}

fn element_json<T: ReadTxn>(e: &XmlElementRef, txn: &T, text: TextAs) -> Value {
    let mut attributes: Vec<(String, Value)> = e
        .attributes(txn)
        .map(|(k, v)| (k.to_owned(), value_json(v, txn, text)))
        .collect();
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
    let children: Vec<Value> = e.children(txn).map(|n| xml_json(n, txn, text)).collect();
    json!({
        "nodeName": e.tag().as_ref(),
        "attributes": Value::Object(attributes.into_iter().collect()),
        "children": children,
    })
}

fn fragment_json<T: ReadTxn>(f: &XmlFragmentRef, txn: &T, text: TextAs) -> Value {
    Value::Array(f.children(txn).map(|n| xml_json(n, txn, text)).collect())
}

fn xml_text_json<T: ReadTxn>(t: &XmlTextRef, txn: &T, text: TextAs) -> Value {
    match text {
        TextAs::String => Value::String(
            t.diff(txn, YChange::identity)
                .into_iter()
                .filter_map(|d| match d.insert {
                    Out::Any(Any::String(s)) => Some(s.to_string()),
                    _ => None,
                })
                .collect(),
        ),
        TextAs::Delta => delta_json(t.diff(txn, YChange::identity), txn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::types::Attrs;
    use yrs::{ArrayPrelim, MapPrelim, StateVector, TextPrelim, XmlElementPrelim, XmlTextPrelim};

    /// A document as an editor backend's clients make one: every kind of root, nesting, and
    /// formatted text, encoded as the server stores it (so every root is untyped on decode).
    fn editor_document() -> Vec<u8> {
        let doc = Doc::with_options(Options {
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let title = doc.get_or_insert_text("title");
        let meta = doc.get_or_insert_map("meta");
        let tags = doc.get_or_insert_array("tags");
        let body = doc.get_or_insert_xml_fragment("body");
        let mut txn = doc.transact_mut();
        title.insert(&mut txn, 0, "Hello world");
        let bold: Attrs = HashMap::from([("bold".into(), Any::Bool(true))]);
        title.format(&mut txn, 6, 5, bold);
        meta.insert(&mut txn, "author", "ada");
        meta.insert(&mut txn, "rev", 3);
        let nested = meta.insert(&mut txn, "nested", MapPrelim::default());
        nested.insert(&mut txn, "list", ArrayPrelim::from([1, 2]));
        nested.insert(&mut txn, "note", TextPrelim::new("inner"));
        tags.push_back(&mut txn, "a");
        tags.push_back(&mut txn, "b");
        let p = body.push_back(&mut txn, XmlElementPrelim::empty("paragraph"));
        p.insert_attribute(&mut txn, "align", "left");
        let t = p.push_back(&mut txn, XmlTextPrelim::new("some text"));
        let italic: Attrs = HashMap::from([("italic".into(), Any::Bool(true))]);
        t.format(&mut txn, 0, 4, italic);
        drop(txn);
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    #[test]
    fn every_root_kind_reads_back_as_json_from_an_untyped_state() {
        let roots = Roots::decode(&editor_document(), &HashMap::new()).expect("decodes");
        let kinds: Vec<(&str, Kind, u32)> = roots
            .roots
            .iter()
            .map(|r| (r.name.as_str(), r.kind, r.len))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("body", Kind::XmlFragment, 1),
                ("meta", Kind::Map, 3),
                ("tags", Kind::Array, 2),
                ("title", Kind::Text, 11),
            ]
        );
        assert_eq!(
            roots.to_json(TextAs::String),
            json!({
                "body": [{"nodeName": "paragraph", "attributes": {"align": "left"}, "children": ["some text"]}],
                "meta": {"author": "ada", "nested": {"list": [1, 2], "note": "inner"}, "rev": 3},
                "tags": ["a", "b"],
                "title": "Hello world",
            })
        );
    }

    #[test]
    fn text_as_delta_keeps_formatting_in_roots_nested_text_and_xml() {
        let roots = Roots::decode(&editor_document(), &HashMap::new()).expect("decodes");
        let json = roots.to_json(TextAs::Delta);
        assert_eq!(
            json["title"],
            json!([{"insert": "Hello "}, {"insert": "world", "attributes": {"bold": true}}])
        );
        assert_eq!(json["meta"]["nested"]["note"], json!([{"insert": "inner"}]));
        assert_eq!(
            json["body"][0]["children"][0],
            json!([{"insert": "some", "attributes": {"italic": true}}, {"insert": " text"}])
        );
    }

    #[test]
    fn named_kinds_settle_what_content_cannot() {
        // A text whose every character was deleted has no live text item left to infer from.
        let doc = Doc::new();
        let t = doc.get_or_insert_text("t");
        t.insert(&mut doc.transact_mut(), 0, "gone");
        t.remove_range(&mut doc.transact_mut(), 0, 4);
        let state = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let guessed = Roots::decode(&state, &HashMap::new()).expect("decodes");
        assert_ne!(guessed.to_json(TextAs::String)["t"], json!(""));
        let hints = HashMap::from([("t".to_owned(), Kind::Text)]);
        let named = Roots::decode(&state, &hints).expect("decodes");
        assert_eq!(named.to_json(TextAs::String), json!({"t": ""}));
        assert_eq!(Kind::parse("xml"), Some(Kind::XmlFragment));
        assert_eq!(Kind::parse("blob"), None);
    }

    #[test]
    fn any_named_kind_on_any_content_reads_without_panicking() {
        let state = editor_document();
        let names = ["body", "meta", "tags", "title"];
        for kind in [Kind::Text, Kind::Map, Kind::Array, Kind::XmlFragment] {
            let hints = names.iter().map(|n| (n.to_string(), kind)).collect();
            let roots = Roots::decode(&state, &hints).expect("decodes");
            assert!(roots.roots.iter().all(|r| r.kind == kind));
            for text in [TextAs::String, TextAs::Delta] {
                assert_eq!(roots.to_json(text).as_object().map(|o| o.len()), Some(4));
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Roots::decode(&[0xff, 0x01, 0x02], &HashMap::new()).is_err());
    }
}
