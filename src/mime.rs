//! Raw RFC 5322 bytes in, one normalized [`Message`] out. Lenient by design:
//! whatever cannot be read is skipped with a reason in `parse_warnings`, and no
//! input, however broken, panics.

use chrono::{DateTime, Utc};
use mailparse::{
    DispositionType, MailAddr, MailHeader, MailHeaderMap, ParsedMail, addrparse_header, dateparse,
};

use crate::model::{AttachmentInfo, EmailAddress, Message, normalize_email};

/// Parses a message. Never fails: an unreadable message yields an empty
/// [`Message`] whose `parse_warnings` say why.
pub fn parse(raw: &[u8]) -> Message {
    contained(|| parse_inner(raw))
}

/// mailparse has panicked on hostile input in older versions; a panic must
/// cost one message, never the mailbox's sync task.
fn contained(parse: impl FnOnce() -> Message + std::panic::UnwindSafe) -> Message {
    std::panic::catch_unwind(parse).unwrap_or_else(|_| Message {
        parse_warnings: vec!["the MIME parser panicked on this message".into()],
        ..Message::default()
    })
}

/// The message's headers alone (no body decoded): all the sync rules read.
/// A catch-up batch's guess of what will sync takes this, and leaves the
/// full parse to the message's turn.
pub fn parse_headers_only(raw: &[u8]) -> Message {
    contained(|| {
        let mut message = Message::default();
        read_header_block(raw, &mut message);
        message
    })
}

/// The header block alone, parsed and read into `message`.
fn read_header_block(raw: &[u8], message: &mut Message) {
    match mailparse::parse_headers(raw) {
        Ok((headers, _)) => read_headers(&headers, message),
        Err(err) => message
            .parse_warnings
            .push(format!("headers unreadable: {err}")),
    }
}

fn parse_inner(raw: &[u8]) -> Message {
    let mut message = Message::default();
    match mailparse::parse_mail(raw) {
        Ok(mail) => {
            read_headers(&mail.headers, &mut message);
            let mut body = BodyParts::default();
            walk(&mail, &mut body, &mut message.parse_warnings);
            message.text = body.text;
            message.html = body.html;
            message.attachments = body.attachments;
        }
        Err(err) => {
            // The body structure is unreadable (e.g. multipart nesting past the
            // parser's limit): keep what the headers say.
            message.parse_warnings.push(format!("body skipped: {err}"));
            read_header_block(raw, &mut message);
        }
    }
    message
}

fn read_headers(headers: &[MailHeader<'_>], message: &mut Message) {
    let warnings = &mut message.parse_warnings;
    message.from = addresses(headers, "From", warnings).into_iter().next();
    message.to = addresses(headers, "To", warnings);
    message.cc = addresses(headers, "Cc", warnings);
    message.bcc = addresses(headers, "Bcc", warnings);
    message.message_id = headers
        .get_first_value("Message-ID")
        .and_then(|v| message_ids(&v).into_iter().next());
    message.in_reply_to = headers
        .get_first_value("In-Reply-To")
        .and_then(|v| message_ids(&v).into_iter().next());
    message.references = headers
        .get_first_value("References")
        .map(|v| message_ids(&v))
        .unwrap_or_default();
    message.subject = headers
        .get_first_value("Subject")
        .map(|s| s.trim().to_string());
    message.date = headers.get_first_value("Date").and_then(|v| parse_date(&v));
    for name in ["Delivered-To", "X-Original-To"] {
        for header in headers.get_all_headers(name) {
            let value = header.get_value();
            let address = value.trim().trim_start_matches('<').trim_end_matches('>');
            if !address.is_empty()
                && address.len() <= 320
                && !address.chars().any(|c| c.is_whitespace() || c.is_control())
                && !message.envelope_to.iter().any(|known| known == address)
            {
                message.envelope_to.push(address.to_string());
            }
        }
    }
    message.crm_send_id = headers
        .get_first_value(crate::compose::SEND_ID_HEADER)
        .map(|v| v.trim().to_string())
        .filter(|id| {
            id.len() <= 64
                && id.starts_with("msg_")
                && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
}

fn parse_date(value: &str) -> Option<DateTime<Utc>> {
    let seconds = dateparse(value).ok()?;
    DateTime::<Utc>::from_timestamp(seconds, 0)
}

fn addresses(
    headers: &[MailHeader<'_>],
    name: &str,
    warnings: &mut Vec<String>,
) -> Vec<EmailAddress> {
    let mut out = Vec::new();
    for header in headers.get_all_headers(name) {
        match addrparse_header(header) {
            Ok(list) => {
                for entry in list.iter() {
                    match entry {
                        MailAddr::Single(single) => {
                            push_address(&mut out, &single.addr, single.display_name.as_deref())
                        }
                        MailAddr::Group(group) => {
                            for single in &group.addrs {
                                push_address(
                                    &mut out,
                                    &single.addr,
                                    single.display_name.as_deref(),
                                );
                            }
                        }
                    }
                }
            }
            Err(err) => {
                // Fall back to anything that looks like an address, so a sloppy
                // header still matches contacts.
                let value = header.get_value();
                let found = lenient_addresses(&value);
                warnings.push(format!(
                    "{name} header malformed ({err}); read {} address(es) leniently",
                    found.len()
                ));
                for email in found {
                    push_address(&mut out, &email, None);
                }
            }
        }
    }
    out
}

fn push_address(out: &mut Vec<EmailAddress>, email: &str, name: Option<&str>) {
    let email = normalize_email(email);
    if !email.contains('@') || email.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return;
    }
    let name = name
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    out.push(EmailAddress { email, name });
}

fn lenient_addresses(value: &str) -> Vec<String> {
    value
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '<' | '>' | '"' | '(' | ')'))
        .filter(|token| {
            let mut parts = token.splitn(2, '@');
            matches!((parts.next(), parts.next()), (Some(local), Some(domain)) if !local.is_empty() && domain.contains('.') && !domain.contains('@'))
        })
        .map(str::to_string)
        .collect()
}

/// Message ids with their angle brackets (`<id@host>`), in header order.
/// Reads `<…>` tokens and falls back to bare tokens, since real mail carries
/// ids that strict RFC 5322 parsers reject.
pub fn message_ids(value: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('>') else { break };
        let id = after[..end].trim();
        if !id.is_empty() && !id.chars().any(char::is_whitespace) {
            ids.push(format!("<{id}>"));
        }
        rest = &after[end + 1..];
    }
    if ids.is_empty() {
        ids = value
            .split_whitespace()
            .filter(|token| token.contains('@'))
            .map(|token| format!("<{}>", token.trim_matches(|c| c == '<' || c == '>')))
            .collect();
    }
    ids
}

#[derive(Default)]
struct BodyParts {
    text: Option<String>,
    html: Option<String>,
    attachments: Vec<AttachmentInfo>,
}

fn walk(part: &ParsedMail<'_>, out: &mut BodyParts, warnings: &mut Vec<String>) {
    if !part.subparts.is_empty() {
        for sub in &part.subparts {
            walk(sub, out, warnings);
        }
        return;
    }
    let disposition = part.get_content_disposition();
    let filename = disposition
        .params
        .get("filename")
        .or_else(|| part.ctype.params.get("name"))
        .cloned();
    let mimetype = part.ctype.mimetype.to_ascii_lowercase();
    let is_body_text = disposition.disposition == DispositionType::Inline && filename.is_none();
    match mimetype.as_str() {
        "text/plain" if is_body_text && out.text.is_none() => match part.get_body() {
            Ok(text) => out.text = Some(text),
            Err(err) => warnings.push(format!("text/plain part skipped: {err}")),
        },
        "text/html" if is_body_text && out.html.is_none() => match part.get_body() {
            Ok(html) => out.html = Some(html),
            Err(err) => warnings.push(format!("text/html part skipped: {err}")),
        },
        _ => match part.get_body_raw() {
            Ok(bytes) => {
                let index = out.attachments.len();
                out.attachments.push(AttachmentInfo {
                    index,
                    filename: filename.unwrap_or_else(|| format!("attachment-{index}")),
                    content_type: mimetype,
                    size: bytes.len(),
                });
            }
            Err(err) => warnings.push(format!("{mimetype} part skipped: {err}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_ids_and_encoded_subject() {
        let raw = concat!(
            "From: =?utf-8?q?J=C3=B6rg?= <Joerg@Example.COM>\r\n",
            "To: \"Doe, Jane\" <jane@example.net>, bob@example.org\r\n",
            "Cc: Team: alice@example.org;\r\n",
            "Subject: =?utf-8?b?R3LDtsOfZQ==?=\r\n",
            "Message-ID: <abc@mail>\r\n",
            "In-Reply-To: <orig@x>\r\n",
            "References: <root@x>\r\n <orig@x>\r\n",
            "Date: Tue, 5 May 2026 10:11:12 +0200\r\n",
            "\r\n",
            "hello\r\n",
        );
        let m = parse(raw.as_bytes());
        let from = m.from.clone().unwrap();
        assert_eq!(from.email, "joerg@example.com");
        assert_eq!(from.name.as_deref(), Some("Jörg"));
        assert_eq!(m.to.len(), 2);
        assert_eq!(m.to[0].name.as_deref(), Some("Doe, Jane"));
        assert_eq!(m.cc[0].email, "alice@example.org");
        assert_eq!(m.subject.as_deref(), Some("Größe"));
        assert_eq!(m.message_id.as_deref(), Some("<abc@mail>"));
        assert_eq!(m.in_reply_to.as_deref(), Some("<orig@x>"));
        assert_eq!(m.references, vec!["<root@x>", "<orig@x>"]);
        assert_eq!(m.date.unwrap().to_rfc3339(), "2026-05-05T08:11:12+00:00");
        assert_eq!(m.text.as_deref(), Some("hello\r\n"));
        assert!(m.parse_warnings.is_empty(), "{:?}", m.parse_warnings);
    }

    /// What the rules read is the same from the headers alone as from the
    /// whole message; the body is left undecoded.
    #[test]
    fn the_headers_alone_say_what_the_rules_read() {
        let raw = concat!(
            "From: Ann <ann@x.test>\r\nTo: me@y.test\r\nCc: bob@x.test\r\n",
            "Subject: =?utf-8?q?Gr=C3=B6=C3=9Fe?=\r\nMessage-ID: <m@x>\r\n",
            "In-Reply-To: <o@y>\r\nReferences: <r@y> <o@y>\r\n",
            "Delivered-To: me@y.test\r\nDate: Tue, 5 May 2026 10:11:12 +0200\r\n",
            "Content-Type: multipart/alternative; boundary=b\r\n\r\n",
            "--b\r\nContent-Type: text/plain; charset=utf-8\r\n",
            "Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n--b--\r\n",
        );
        let whole = parse(raw.as_bytes());
        let headers = parse_headers_only(raw.as_bytes());
        assert_eq!(
            Message {
                text: None,
                html: None,
                attachments: Vec::new(),
                ..whole.clone()
            },
            headers
        );
        assert_eq!(whole.text.as_deref(), Some("Grüße"));
        assert_eq!(headers.text, None);
    }

    #[test]
    fn lenient_message_ids() {
        assert_eq!(message_ids("<a@b> <c@d>"), vec!["<a@b>", "<c@d>"]);
        assert_eq!(message_ids("a@b"), vec!["<a@b>"]);
        assert_eq!(message_ids("<a@b"), vec!["<a@b>"]);
        assert_eq!(message_ids("<>"), Vec::<String>::new());
        assert_eq!(message_ids(""), Vec::<String>::new());
    }

    #[test]
    fn deep_nesting_keeps_the_headers() {
        let mut raw = String::from("From: ann@x.test\r\nMessage-ID: <deep@x>\r\n");
        for i in 0..150 {
            raw.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=x{i}y\r\n\r\n--x{i}y\r\n"
            ));
        }
        let m = parse(raw.as_bytes());
        assert_eq!(m.from.unwrap().email, "ann@x.test");
        assert_eq!(m.message_id.as_deref(), Some("<deep@x>"));
        assert!(!m.parse_warnings.is_empty());
    }

    // These call `parse_inner`, not `parse`: `parse` would hide a panic behind
    // its catch_unwind, and then the tests could not fail.
    #[test]
    fn garbage_never_panics_and_says_what_was_skipped() {
        for raw in [
            &b""[..],
            b"\xff\xfe\x00\x01",
            b"To: <<<@@@>>>, \"unterminated\r\n\r\nb",
            b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
        ] {
            let _ = parse_inner(raw);
        }
        let bad_base64 = parse_inner(b"Content-Transfer-Encoding: base64\r\n\r\n!!!notbase64***");
        assert!(
            bad_base64
                .parse_warnings
                .iter()
                .any(|w| w.contains("skipped")),
            "{:?}",
            bad_base64.parse_warnings
        );
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = parse_inner(&raw);
        }
    }

    /// CPython's email test corpus (see tests/fixtures/cpython-email).
    static CORPUS: std::sync::LazyLock<Vec<Vec<u8>>> = std::sync::LazyLock::new(|| {
        let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cpython-email");
        let mut names: Vec<_> = std::fs::read_dir(folder)
            .expect("the seed corpus")
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "txt"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|path| std::fs::read(path).expect("a seed"))
            .collect()
    });

    /// What MIME parsers trip on: boundaries, encodings, encoded words, charsets.
    const MIME_TOKENS: [&[u8]; 16] = [
        b"\r\n--",
        b"\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=\"b\"\r\n",
        b"\r\n--b\r\n",
        b"\r\n--b--\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"=?utf-8?B?w6k=?=",
        b"=?iso-8859-1?Q?=E9_x?=",
        b"; charset=\"utf-16\"",
        b"Content-Disposition: attachment; filename*=UTF-8''%E2%82%AC.pdf\r\n",
        b"=\r\n",
        b"\x00",
        b"\xff\xfe",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"From: \"a\\\"b\" <@@>,,\r\n",
    ];

    /// The message parsed from `raw` must not panic, and what it holds is
    /// bounded by its size (no decoding blows a small message up).
    fn parses_within_bounds(raw: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        let message = parse_inner(raw);
        let held = message.text.as_ref().map_or(0, String::len)
            + message.html.as_ref().map_or(0, String::len)
            + message.subject.as_ref().map_or(0, String::len)
            + message
                .attachments
                .iter()
                .map(|a| a.size + a.filename.len())
                .sum::<usize>();
        proptest::prop_assert!(
            held <= 4 * raw.len() + 4096,
            "{held} bytes held from a {}-byte message",
            raw.len()
        );
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(crate::mutation::bounded(512))]
        /// Issue 10: real messages, broken the way senders and relays break them.
        #[test]
        fn edited_real_messages_parse_within_bounds(
            (seed, edits) in crate::mutation::edited(CORPUS.len(), MIME_TOKENS.len(), 12)
        ) {
            let raw = crate::mutation::apply(&CORPUS[seed], &edits, &MIME_TOKENS);
            parses_within_bounds(&raw)?;
        }
    }

    /// The long run: `cargo test --release -- --ignored fuzz`.
    #[test]
    #[ignore]
    fn fuzz_mime_long() {
        let seeds: Vec<&[u8]> = CORPUS.iter().map(Vec::as_slice).collect();
        crate::mutation::run_long(&seeds, &MIME_TOKENS, 24, parses_within_bounds);
    }
}

/// The bytes of attachment `index` (numbered as in [`Message::attachments`]):
/// (filename, content type, transfer-decoded bytes).
pub fn attachment(raw: &[u8], index: usize) -> Option<(String, String, Vec<u8>)> {
    let found = std::panic::catch_unwind(|| {
        let mail = mailparse::parse_mail(raw).ok()?;
        let mut leaves = Vec::new();
        collect_attachments(&mail, &mut BodyParts::default(), &mut leaves);
        leaves.into_iter().nth(index)
    });
    found.ok().flatten()
}

/// Walks the parts like [`walk`], collecting the attachments' bytes.
fn collect_attachments(
    part: &ParsedMail<'_>,
    body: &mut BodyParts,
    out: &mut Vec<(String, String, Vec<u8>)>,
) {
    if !part.subparts.is_empty() {
        for sub in &part.subparts {
            collect_attachments(sub, body, out);
        }
        return;
    }
    let before = body.attachments.len();
    let mut warnings = Vec::new();
    walk(part, body, &mut warnings);
    if body.attachments.len() > before
        && let (Some(info), Ok(bytes)) = (body.attachments.last(), part.get_body_raw())
    {
        out.push((info.filename.clone(), info.content_type.clone(), bytes));
    }
}

#[cfg(test)]
mod attachment_tests {
    #[test]
    fn attachment_bytes_are_served_by_index() {
        let raw = concat!(
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n",
            "--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n",
            "--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\n",
            "Content-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n",
            "--b--\r\n"
        );
        let (name, content_type, bytes) = super::attachment(raw.as_bytes(), 0).unwrap();
        assert_eq!(
            (name.as_str(), content_type.as_str(), bytes.as_slice()),
            ("a.pdf", "application/pdf", &b"%PDF"[..])
        );
        assert!(super::attachment(raw.as_bytes(), 1).is_none());
        assert_eq!(super::parse(raw.as_bytes()).attachments[0].size, 4);
    }
}
