//! Building the MIME of a CRM send with lettre: text and/or HTML as
//! multipart/alternative, attachments, encoded non-ASCII headers, a fresh
//! Message-ID on the sender's domain, and reply headers (RFC 5322 §3.6.4).

use lettre::message::{Attachment, Mailbox as Address, MultiPart, SinglePart, header::ContentType};

/// Names the CRM send a message is, whatever the server does to its
/// Message-ID: Exchange Online replaces it, and its copy in Sent must still be
/// known as the CRM's own (R5) and be found before a retry.
pub const SEND_ID_HEADER: &str = "X-Mailbridge-Send-Id";

#[derive(Clone)]
struct SendIdHeader(String);

impl lettre::message::header::Header for SendIdHeader {
    fn name() -> lettre::message::header::HeaderName {
        lettre::message::header::HeaderName::new_from_ascii_str(SEND_ID_HEADER)
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(s.to_string()))
    }

    fn display(&self) -> lettre::message::header::HeaderValue {
        lettre::message::header::HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// Everything a send needs, already validated.
#[derive(Clone, Debug)]
pub struct Draft {
    /// The bridge's id of the send (`msg_…`), carried in [`SEND_ID_HEADER`].
    pub send_id: String,
    pub from: String,
    pub from_name: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<DraftAttachment>,
    pub message_id: String,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct DraftAttachment {
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ComposeError {
    ComposeError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// A Message-ID on the sender's domain, so Gmail and others thread replies to it.
pub fn new_message_id(from: &str) -> String {
    let domain = from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("mailbridge.invalid");
    format!("<{}@{domain}>", uuid::Uuid::now_v7().simple())
}

fn address(field: &str, email: &str, name: Option<&str>) -> Result<Address, ComposeError> {
    let parsed = email
        .parse()
        .map_err(|e| invalid(field, format!("{email:?} is not a valid address ({e})")))?;
    Ok(Address::new(name.map(str::to_string), parsed))
}

impl Draft {
    /// The message as submitted (without a Bcc header) and, when it has Bcc
    /// recipients, as filed in Sent (with the header, so the user sees whom they
    /// blind-copied). Without Bcc both are the same bytes, built once.
    pub fn build(&self) -> Result<(Vec<u8>, Option<Vec<u8>>), ComposeError> {
        let submitted = self.message(false)?.formatted();
        if self.bcc.is_empty() {
            return Ok((submitted, None));
        }
        let filed = self.message(true)?.formatted();
        Ok((submitted, Some(filed)))
    }

    fn message(&self, keep_bcc: bool) -> Result<lettre::Message, ComposeError> {
        let mut builder = lettre::Message::builder()
            .from(address("from", &self.from, self.from_name.as_deref())?)
            .subject(self.subject.clone())
            .message_id(Some(self.message_id.clone()))
            .header(SendIdHeader(self.send_id.clone()))
            .date_now();
        for (i, to) in self.to.iter().enumerate() {
            builder = builder.to(address(&format!("to[{i}]"), to, None)?);
        }
        for (i, cc) in self.cc.iter().enumerate() {
            builder = builder.cc(address(&format!("cc[{i}]"), cc, None)?);
        }
        for (i, bcc) in self.bcc.iter().enumerate() {
            builder = builder.bcc(address(&format!("bcc[{i}]"), bcc, None)?);
        }
        if let Some(parent) = &self.in_reply_to {
            builder = builder.in_reply_to(parent.clone());
        }
        if !self.references.is_empty() {
            builder = builder.references(self.references.join(" "));
        }
        if keep_bcc {
            builder = builder.keep_bcc();
        }
        let body = match (&self.text, &self.html) {
            (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(
                text.clone(),
                html.clone(),
            )),
            (None, Some(html)) => Body::Single(SinglePart::html(html.clone())),
            (Some(text), None) => Body::Single(SinglePart::plain(text.clone())),
            (None, None) => Body::Single(SinglePart::plain(String::new())),
        };
        let message = if self.attachments.is_empty() {
            match body {
                Body::Multi(multi) => builder.multipart(multi),
                Body::Single(single) => builder.singlepart(single),
            }
        } else {
            let mut mixed = match body {
                Body::Multi(multi) => MultiPart::mixed().multipart(multi),
                Body::Single(single) => MultiPart::mixed().singlepart(single),
            };
            for (i, a) in self.attachments.iter().enumerate() {
                let content_type = ContentType::parse(&a.content_type)
                    .map_err(|e| invalid(&format!("attachments[{i}].content_type"), e))?;
                mixed = mixed.singlepart(
                    Attachment::new(a.filename.clone()).body(a.bytes.clone(), content_type),
                );
            }
            builder.multipart(mixed)
        };
        message.map_err(|e| invalid("message", e))
    }
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

/// The reply subject: `Re: ` once, however often the thread went back and forth.
pub fn reply_subject(subject: &str) -> String {
    let trimmed = subject.trim();
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("re:") || lower.starts_with("re :") {
        trimmed.to_string()
    } else {
        format!("Re: {trimmed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mime;

    fn draft() -> Draft {
        Draft {
            send_id: "msg_0192abc".into(),
            from: "me@example.test".into(),
            from_name: Some("Jörg Müller".into()),
            to: vec!["ann@example.org".into()],
            cc: vec!["cc@example.org".into()],
            bcc: vec!["hidden@example.org".into()],
            subject: "Angebot – Größe ✓".into(),
            text: Some("Hallo".into()),
            html: Some("<p>Hallo</p>".into()),
            attachments: vec![DraftAttachment {
                filename: "offer.pdf".into(),
                content_type: "application/pdf".into(),
                bytes: b"%PDF-1.4".to_vec(),
            }],
            message_id: "<abc@example.test>".into(),
            in_reply_to: Some("<parent@example.org>".into()),
            references: vec!["<root@example.org>".into(), "<parent@example.org>".into()],
        }
    }

    #[test]
    fn builds_what_the_parser_reads_back() {
        let (submitted, filed) = draft().build().unwrap();
        let m = mime::parse(&submitted);
        assert_eq!(m.subject.as_deref(), Some("Angebot – Größe ✓"));
        assert_eq!(m.from.unwrap().name.as_deref(), Some("Jörg Müller"));
        assert_eq!(m.message_id.as_deref(), Some("<abc@example.test>"));
        assert_eq!(m.crm_send_id.as_deref(), Some("msg_0192abc"));
        assert_eq!(m.in_reply_to.as_deref(), Some("<parent@example.org>"));
        assert_eq!(
            m.references,
            vec!["<root@example.org>", "<parent@example.org>"]
        );
        assert_eq!(m.text.as_deref().map(str::trim), Some("Hallo"));
        assert!(m.html.unwrap().contains("<p>Hallo</p>"));
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].filename, "offer.pdf");
        assert!(m.bcc.is_empty(), "the submitted copy carries no Bcc header");
        assert_eq!(
            mime::parse(&filed.unwrap()).bcc[0].email,
            "hidden@example.org"
        );
        let mut no_bcc = draft();
        no_bcc.bcc.clear();
        assert!(
            no_bcc.build().unwrap().1.is_none(),
            "one copy when there is no Bcc"
        );
        assert!(submitted.is_ascii(), "non-ASCII headers are encoded");
    }

    #[test]
    fn reply_subjects_do_not_stack() {
        assert_eq!(reply_subject("offer"), "Re: offer");
        assert_eq!(reply_subject("RE: offer"), "RE: offer");
        assert_eq!(reply_subject(" Re: offer "), "Re: offer");
    }

    #[test]
    fn message_ids_live_on_the_senders_domain() {
        assert!(new_message_id("me@example.test").ends_with("@example.test>"));
    }
}
