//! The sync rules (R1–R21) as one pure function: a parsed message plus what the
//! directory knows in, decisions out. No I/O, no clock, no randomness: the caller
//! loads the directory and the thread, and mints ids for new threads.

use std::fmt;

use crate::model::{
    Contact, Direction, FolderRole, Integration, Message, Origin, Thread, ThreadRoute,
    normalize_email,
};

/// A message as found in a mailbox folder.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    pub message: &'a Message,
    pub folder: FolderRole,
    pub uid_validity: u32,
    pub uid: u32,
    /// When the server received it (INTERNALDATE), if it said.
    pub received_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The CRM sent this Message-ID through the bridge from this mailbox.
    pub sent_by_crm: bool,
}

/// What the directory holds that matters for one message: the mailbox's
/// integrations and every contact (of those integrations' locations) that has one
/// of the message's addresses.
#[derive(Clone, Copy, Debug)]
pub struct Directory<'a> {
    pub mailbox: &'a str,
    pub integrations: &'a [Integration],
    pub contacts: &'a [Contact],
    /// Integrations (location, user) that already received this message,
    /// found before under another UID or in another folder.
    pub already_synced: &'a [(String, String)],
    /// Integrations (location, user) whose smart address the receiving
    /// server named in the envelope (Auto BCC's catch-all, door 2): a Bcc
    /// leaves no header behind.
    pub logged_by_envelope: &'a [(String, String)],
    /// The message's addresses that are smart addresses (any integration's,
    /// or shaped like one): never created as contacts (R15).
    pub smart_addresses: &'a [String],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub route: ThreadRoute,
    pub direction: Direction,
    pub origin: Origin,
    /// Every contact the message names in that conversation, the route's
    /// contact first (R7, R8).
    pub contact_ids: Vec<String>,
    /// The rule that decided it, for `mailbridge inspect`.
    pub rule: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThreadDecision {
    /// The message belongs to a thread that already syncs (R6).
    Continue { thread_id: String },
    /// The message starts a new synced thread with these conversations.
    Start,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routing {
    Ignore(IgnoreReason),
    Deliver {
        thread: ThreadDecision,
        deliveries: Vec<Delivery>,
        /// Contacts Auto BCC creates (R15), before the message lands.
        new_contacts: Vec<NewContact>,
    },
}

/// A contact Auto BCC creates: a To recipient of mail the user logged (R15).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewContact {
    pub location_id: String,
    /// Assigned to this user.
    pub user_id: String,
    /// Derived from location and address: both doors, and a retry, name the same contact.
    pub id: String,
    pub email: String,
    pub name: Option<String>,
}

/// The id Auto BCC gives the contact it creates for `email` in `location_id`.
pub fn auto_contact_id(location_id: &str, email: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{location_id}\0{email}").as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("auto_{hex}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    /// No integration uses the mailbox any more (R18, R19).
    NoIntegration,
    /// Arrived before every integration was connected (R2).
    BeforeConnect,
    /// Mail the user sent, seen in the inbox (the Sent folder reports it).
    OwnMessageInInbox,
    /// No From address to match.
    NoSender,
    /// The sender is no contact assigned to the integration's user (R3).
    SenderNotContact,
    /// No recipient is a contact assigned to the integration's user (R4).
    NoRecipientContact,
    /// The message's thread syncs, but to no integration that still uses this mailbox.
    ThreadDetached,
    /// The CRM sent it through the bridge; `message.sent` already reported it (R5).
    SentByCrm,
    /// Every integration it would go to already received it (moved out and
    /// back, restored, filed twice): nothing is forwarded twice (R21).
    AlreadySynced,
    /// Mail in the Auto BCC catch-all that names no smart address the bridge
    /// handed out (a wrong or forged token), or has no sender (R15).
    NoSmartAddress,
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IgnoreReason::NoIntegration => "no integration uses this mailbox",
            IgnoreReason::BeforeConnect => "arrived before the integration was connected (R2)",
            IgnoreReason::OwnMessageInInbox => {
                "sent by the mailbox itself; the Sent folder reports it"
            }
            IgnoreReason::NoSender => "no From address",
            IgnoreReason::SenderNotContact => {
                "sender is not a contact assigned to the integration's user (R3)"
            }
            IgnoreReason::NoRecipientContact => {
                "no recipient is a contact assigned to the integration's user (R4)"
            }
            IgnoreReason::ThreadDetached => {
                "its thread syncs to no integration that still uses this mailbox"
            }
            IgnoreReason::SentByCrm => "sent by the CRM through the bridge (R5)",
            IgnoreReason::AlreadySynced => {
                "already forwarded to every integration it belongs to (R21)"
            }
            IgnoreReason::NoSmartAddress => {
                "in the Auto BCC catch-all, but names no smart address the bridge handed out (R15)"
            }
        })
    }
}

/// How the thread handed to routing was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadLink {
    /// By a message this one answers, or by its own id (the same message
    /// read again): a later message of the thread.
    Answers,
    /// Only by a message of the thread that answers this one: an earlier
    /// message, read after its reply. Folders are read in no fixed order (a
    /// session per folder, or a restart after mail came in both).
    AnsweredBy,
}

/// Decides where a message goes, its thread found by what it answers.
pub fn route(incoming: Incoming<'_>, directory: Directory<'_>, thread: Option<&Thread>) -> Routing {
    route_linked(
        incoming,
        directory,
        thread.map(|thread| (thread, ThreadLink::Answers)),
    )
}

/// Decides where a message goes, given how its thread was found.
pub fn route_linked(
    incoming: Incoming<'_>,
    directory: Directory<'_>,
    thread: Option<(&Thread, ThreadLink)>,
) -> Routing {
    let message = incoming.message;
    let mailbox = normalize_email(directory.mailbox);
    if directory.integrations.is_empty() {
        return Routing::Ignore(IgnoreReason::NoIntegration);
    }
    let live: Vec<&Integration> = directory
        .integrations
        .iter()
        .filter(|i| i.mailbox == mailbox)
        .filter(|i| {
            i.accepts(
                incoming.folder,
                incoming.uid_validity,
                incoming.uid,
                incoming.received_at,
            )
        })
        .collect();
    if live.is_empty() {
        return Routing::Ignore(IgnoreReason::BeforeConnect);
    }
    let live = r21_not_yet_synced(live, directory.already_synced);
    if live.is_empty() {
        return Routing::Ignore(IgnoreReason::AlreadySynced);
    }
    let sender = message.from.as_ref().map(|a| normalize_email(&a.email));
    let direction = match incoming.folder {
        // R5: the CRM already heard of it as message.sent; its copy in Sent
        // must not come back as message.outbound.
        FolderRole::Sent if incoming.sent_by_crm => {
            return Routing::Ignore(IgnoreReason::SentByCrm);
        }
        FolderRole::Sent => Direction::Outbound,
        // A listed folder or Gmail's All Mail (where server rules file mail)
        // is inbound mail too; the user's own mail there is synced from Sent.
        FolderRole::Inbox | FolderRole::All | FolderRole::Listed(_)
            if sender.as_deref() == Some(mailbox.as_str()) =>
        {
            return Routing::Ignore(IgnoreReason::OwnMessageInInbox);
        }
        FolderRole::Inbox | FolderRole::All | FolderRole::Listed(_) => Direction::Inbound,
    };

    let routing = match thread {
        Some((thread, ThreadLink::AnsweredBy)) => r06_join_as_earlier(
            thread, message, sender, direction, &mailbox, &live, &directory,
        ),
        // A forward logged through a smart address is Auto BCC's (R15).
        Some(_)
            if direction == Direction::Outbound
                && is_forward(message)
                && live
                    .iter()
                    .any(|i| names_smart_address(message, i, directory.logged_by_envelope)) =>
        {
            r15_outbound(message, &mailbox, &live, &directory)
        }
        Some((thread, _)) if direction == Direction::Outbound && is_forward(message) => {
            r16_forward(thread, message, &live, directory.contacts)
        }
        Some((thread, _)) => r06_continue_thread(thread, &live, direction),
        None if direction == Direction::Outbound => {
            r15_outbound(message, &mailbox, &live, &directory)
        }
        None => start_thread(message, sender, direction, &live, directory.contacts),
    };
    match routing {
        Routing::Deliver {
            thread,
            deliveries,
            new_contacts,
        } => Routing::Deliver {
            thread,
            deliveries: deliveries
                .into_iter()
                .map(|mut delivery| {
                    // Logged through the smart address, in a thread that syncs.
                    if direction == Direction::Outbound
                        && live.iter().any(|i| {
                            i.location_id == delivery.route.location_id
                                && i.user_id == delivery.route.user_id
                                && names_smart_address(message, i, directory.logged_by_envelope)
                        })
                    {
                        delivery.origin = Origin::AutoBcc;
                    }
                    r07_r08_name_every_contact(delivery, message, &directory)
                })
                .collect(),
            new_contacts,
        },
        ignored => ignored,
    }
}

/// Whether the integration's smart address is among the recipients (or the
/// envelope's).
fn names_smart_address(
    message: &Message,
    integration: &Integration,
    logged_by_envelope: &[(String, String)],
) -> bool {
    if logged_by_envelope.iter().any(|(location, user)| {
        *location == integration.location_id && *user == integration.user_id
    }) {
        return true;
    }
    let smart = normalize_email(&integration.smart_bcc_address);
    !smart.is_empty()
        && message
            .to
            .iter()
            .chain(&message.cc)
            .chain(&message.bcc)
            .any(|a| normalize_email(&a.email) == smart)
}

/// Mail sent from the mailbox, of no synced thread: per integration, Auto
/// BCC where the user put its smart address on it (R15), else the first
/// contact among the recipients (R4, R9).
fn r15_outbound(
    message: &Message,
    mailbox: &str,
    live: &[&Integration],
    directory: &Directory<'_>,
) -> Routing {
    let contacts = directory.contacts;
    let logged_by_envelope = directory.logged_by_envelope;
    let mut deliveries = Vec::new();
    let mut new_contacts = Vec::new();
    for integration in live {
        if names_smart_address(message, integration, logged_by_envelope)
            && let Some((delivery, created)) =
                r15_auto_bcc(message, mailbox, integration, directory)
        {
            deliveries.push(delivery);
            // Two integrations of one location create its contact once.
            for contact in created {
                if !new_contacts.iter().any(|c: &NewContact| {
                    c.location_id == contact.location_id && c.id == contact.id
                }) {
                    new_contacts.push(contact);
                }
            }
            continue;
        }
        deliveries.extend(r04_r09_outbound_to_contact(
            message,
            &[*integration],
            contacts,
        ));
    }
    if deliveries.is_empty() {
        return Routing::Ignore(IgnoreReason::NoRecipientContact);
    }
    Routing::Deliver {
        thread: ThreadDecision::Start,
        deliveries,
        new_contacts,
    }
}

/// R15: every To recipient (not the mailbox, not a smart address) that is no
/// contact of the location yet becomes one, assigned to the user; the first
/// To recipient owns the conversation. Cc and Bcc create nothing (R7).
fn r15_auto_bcc(
    message: &Message,
    mailbox: &str,
    integration: &Integration,
    directory: &Directory<'_>,
) -> Option<(Delivery, Vec<NewContact>)> {
    let contacts = directory.contacts;
    let smart = normalize_email(&integration.smart_bcc_address);
    let mut to: Vec<(String, Option<String>)> = Vec::new();
    for recipient in &message.to {
        let email = normalize_email(&recipient.email);
        let a_smart_address = email == smart || directory.smart_addresses.contains(&email);
        if email != mailbox && !a_smart_address && !to.iter().any(|(e, _)| *e == email) {
            to.push((email, recipient.name.clone()));
        }
    }
    let mut owner: Option<String> = None;
    let mut named = Vec::new();
    let mut created = Vec::new();
    for (email, name) in to {
        let in_location: Vec<&Contact> = contacts
            .iter()
            .filter(|c| c.location_id == integration.location_id && c.has_email(&email))
            .collect();
        let id = match r10_first_created(contacts, integration, &email) {
            Some(assigned) => assigned.id.clone(),
            // A contact of the location, not assigned to the user: it is
            // known, so nothing is created (R10 picks among them).
            None => match in_location.iter().min_by(|a, b| {
                a.created_at
                    .cmp(&b.created_at)
                    .then_with(|| a.id.cmp(&b.id))
            }) {
                Some(known) => known.id.clone(),
                None => {
                    let id = auto_contact_id(&integration.location_id, &email);
                    created.push(NewContact {
                        location_id: integration.location_id.clone(),
                        user_id: integration.user_id.clone(),
                        id: id.clone(),
                        email,
                        name: name.filter(|n| !n.trim().is_empty()),
                    });
                    id
                }
            },
        };
        if owner.is_none() {
            owner = Some(id.clone());
        }
        named.push(id);
    }
    let owner = owner?;
    Some((
        Delivery {
            route: ThreadRoute {
                location_id: integration.location_id.clone(),
                user_id: integration.user_id.clone(),
                contact_id: owner,
            },
            direction: Direction::Outbound,
            origin: Origin::AutoBcc,
            contact_ids: named,
            rule: "R15",
        },
        created,
    ))
}

/// R7 + R8: every existing contact of the delivery's location, assigned to
/// its user, that the message names in From/To/Cc/Bcc (the mailbox aside),
/// the conversation's own contact first. Nothing is created for them.
fn r07_r08_name_every_contact(
    mut delivery: Delivery,
    message: &Message,
    directory: &Directory<'_>,
) -> Delivery {
    let mailbox = normalize_email(directory.mailbox);
    let mut named = vec![delivery.route.contact_id.clone()];
    // Contacts the routing created or chose already (Auto BCC), in To order.
    for id in std::mem::take(&mut delivery.contact_ids) {
        if !named.contains(&id) {
            named.push(id);
        }
    }
    for address in message
        .from
        .iter()
        .chain(&message.to)
        .chain(&message.cc)
        .chain(&message.bcc)
        .map(|a| normalize_email(&a.email))
        .filter(|address| *address != mailbox)
    {
        let mut matching: Vec<&Contact> = directory
            .contacts
            .iter()
            .filter(|c| c.location_id == delivery.route.location_id)
            .filter(|c| c.is_assigned_to(&delivery.route.user_id))
            .filter(|c| c.has_email(&address))
            .collect();
        matching.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        for contact in matching {
            if !named.contains(&contact.id) {
                named.push(contact.id.clone());
            }
        }
    }
    delivery.contact_ids = named;
    delivery
}

/// Whether the subject marks a forward, in the words mail clients use
/// ("Fwd:", Outlook's "FW:", German "WG:", French "TR:", Spanish "RV:", …).
fn is_forward(message: &Message) -> bool {
    let Some(subject) = &message.subject else {
        return false;
    };
    let Some((prefix, _)) = subject.trim_start().split_once(':') else {
        return false;
    };
    matches!(
        prefix.trim().to_ascii_lowercase().as_str(),
        "fwd" | "fw" | "wg" | "tr" | "rv" | "enc" | "vs" | "vb" | "fs" | "doorst"
    )
}

/// R16: a forward carries the References of the thread it came from (Gmail
/// does), but it is a sent message of the conversation of the contact it is
/// sent to. It stays in the thread only where it goes to the thread's own
/// conversation; otherwise it starts its own.
fn r16_forward(
    thread: &Thread,
    message: &Message,
    live: &[&Integration],
    contacts: &[Contact],
) -> Routing {
    let fresh = start_thread(message, None, Direction::Outbound, live, contacts);
    let Routing::Deliver { deliveries, .. } = &fresh else {
        return fresh;
    };
    if deliveries.iter().all(|d| thread.routes.contains(&d.route)) {
        return r06_continue_thread(thread, live, Direction::Outbound);
    }
    match fresh {
        Routing::Deliver {
            thread,
            deliveries,
            new_contacts,
        } => Routing::Deliver {
            thread,
            deliveries: deliveries
                .into_iter()
                .map(|d| Delivery { rule: "R16", ..d })
                .collect(),
            new_contacts,
        },
        ignored => ignored,
    }
}

/// A message of no synced thread: who it goes to, if anyone (R3, R4, R9, R11).
fn start_thread(
    message: &Message,
    sender: Option<String>,
    direction: Direction,
    live: &[&Integration],
    contacts: &[Contact],
) -> Routing {
    let deliveries: Vec<Delivery> = match direction {
        Direction::Inbound => {
            let Some(sender) = sender else {
                return Routing::Ignore(IgnoreReason::NoSender);
            };
            r03_r11_inbound_from_contact(&sender, live, contacts)
        }
        Direction::Outbound => r04_r09_outbound_to_contact(message, live, contacts),
    };
    if deliveries.is_empty() {
        return Routing::Ignore(match direction {
            Direction::Inbound => IgnoreReason::SenderNotContact,
            Direction::Outbound => IgnoreReason::NoRecipientContact,
        });
    }
    Routing::Deliver {
        thread: ThreadDecision::Start,
        deliveries,
        new_contacts: Vec::new(),
    }
}

/// R21: an integration that already received the message (under another UID,
/// in another folder) does not get it again.
fn r21_not_yet_synced<'i>(
    live: Vec<&'i Integration>,
    already_synced: &[(String, String)],
) -> Vec<&'i Integration> {
    live.into_iter()
        .filter(|i| {
            !already_synced
                .iter()
                .any(|(location, user)| *location == i.location_id && *user == i.user_id)
        })
        .collect()
}

/// R6: later messages of a synced thread, from anyone, go to the thread's
/// conversations, as long as their integration still uses this mailbox (R18, R19).
fn r06_continue_thread(thread: &Thread, live: &[&Integration], direction: Direction) -> Routing {
    let deliveries: Vec<Delivery> = thread
        .routes
        .iter()
        .filter(|r| {
            live.iter()
                .any(|i| i.location_id == r.location_id && i.user_id == r.user_id)
        })
        .map(|r| Delivery {
            route: r.clone(),
            direction,
            origin: Origin::Mailbox,
            contact_ids: Vec::new(),
            rule: "R6",
        })
        .collect();
    if deliveries.is_empty() {
        return Routing::Ignore(IgnoreReason::ThreadDetached);
    }
    Routing::Deliver {
        thread: ThreadDecision::Continue {
            thread_id: thread.id.clone(),
        },
        deliveries,
        new_contacts: Vec::new(),
    }
}

/// R6 whatever the order folders are read in: an earlier message of a synced
/// thread, read after the reply that answers it, is admitted as if it had
/// come first (R3, R4, R15: a stranger's original stays out), and then goes
/// to the reply's thread and conversations, where it would have been had it
/// been read first.
fn r06_join_as_earlier(
    thread: &Thread,
    message: &Message,
    sender: Option<String>,
    direction: Direction,
    mailbox: &str,
    live: &[&Integration],
    directory: &Directory<'_>,
) -> Routing {
    let first = match direction {
        Direction::Outbound => r15_outbound(message, mailbox, live, directory),
        Direction::Inbound => start_thread(message, sender, direction, live, directory.contacts),
    };
    let Routing::Deliver {
        deliveries,
        new_contacts,
        ..
    } = first
    else {
        return first;
    };
    let admitted: Vec<&Integration> = live
        .iter()
        .copied()
        .filter(|i| {
            deliveries
                .iter()
                .any(|d| d.route.location_id == i.location_id && d.route.user_id == i.user_id)
        })
        .collect();
    // Joined only where the thread has a conversation for every integration
    // that admits it: else it starts its own, as it did before it had a
    // reply, and no integration goes without it.
    let joins = admitted.iter().all(|i| {
        thread
            .routes
            .iter()
            .any(|r| r.location_id == i.location_id && r.user_id == i.user_id)
    });
    if !joins {
        return Routing::Deliver {
            thread: ThreadDecision::Start,
            deliveries,
            new_contacts,
        };
    }
    match r06_continue_thread(thread, &admitted, direction) {
        Routing::Deliver {
            thread, deliveries, ..
        } => Routing::Deliver {
            thread,
            deliveries,
            new_contacts,
        },
        ignored => ignored,
    }
}

/// The messages a synced message answers, filed under its thread so that
/// they find it when read later (see [`ThreadLink::AnsweredBy`]). A forward
/// files none: what it forwards belongs to the conversation it came from
/// (R16).
pub fn answered_ids(message: &Message) -> Vec<String> {
    if is_forward(message) {
        return Vec::new();
    }
    message.parent_ids()
}

/// R3 + R11: a message from a contact goes to every location where the sender
/// is a contact assigned to that location's integrated user.
fn r03_r11_inbound_from_contact(
    sender: &str,
    live: &[&Integration],
    contacts: &[Contact],
) -> Vec<Delivery> {
    live.iter()
        .filter_map(|integration| {
            r10_first_created(contacts, integration, sender).map(|contact| Delivery {
                route: ThreadRoute {
                    location_id: integration.location_id.clone(),
                    user_id: integration.user_id.clone(),
                    contact_id: contact.id.clone(),
                },
                direction: Direction::Inbound,
                origin: Origin::Mailbox,
                contact_ids: Vec::new(),
                rule: "R3, R11",
            })
        })
        .collect()
}

/// R4 + R9 (+ R7, R16): mail sent from the mailbox goes to the conversation of
/// the first recipient that is a contact: To first, then Cc, then Bcc, in header
/// order. Cc/Bcc addresses never create contacts; they only match existing ones.
fn r04_r09_outbound_to_contact(
    message: &Message,
    live: &[&Integration],
    contacts: &[Contact],
) -> Vec<Delivery> {
    let recipients: Vec<String> = message
        .to
        .iter()
        .chain(&message.cc)
        .chain(&message.bcc)
        .map(|a| normalize_email(&a.email))
        .collect();
    live.iter()
        .filter_map(|integration| {
            recipients
                .iter()
                .find_map(|address| r10_first_created(contacts, integration, address))
                .map(|contact| Delivery {
                    route: ThreadRoute {
                        location_id: integration.location_id.clone(),
                        user_id: integration.user_id.clone(),
                        contact_id: contact.id.clone(),
                    },
                    direction: Direction::Outbound,
                    origin: Origin::Mailbox,
                    contact_ids: Vec::new(),
                    rule: "R4, R9",
                })
        })
        .collect()
}

/// R12 + R13: a CRM send from `sender`'s location binds the thread there. A new
/// thread has that one conversation; a reply in a thread that went to several
/// locations (R11) pins it to the replying one. Returns the thread's routes and
/// the conversations that stop receiving it (`thread.detached`).
pub fn r13_pin_thread(
    routes: &[ThreadRoute],
    sender: &ThreadRoute,
) -> (Vec<ThreadRoute>, Vec<ThreadRoute>) {
    let (kept, detached): (Vec<ThreadRoute>, Vec<ThreadRoute>) = routes
        .iter()
        .cloned()
        .partition(|r| r.location_id == sender.location_id);
    if kept.is_empty() {
        (vec![sender.clone()], detached)
    } else {
        (kept, detached)
    }
}

/// R13, R18, R19: the conversations a later change of a synced message (read,
/// starred, moved, deleted) still goes to: of those it was forwarded to
/// (`routes`), the ones its thread still syncs to. Not a conversation a CRM
/// reply pinned to another location (R13: gone from the thread's routes), nor
/// one whose user's integration now uses another mailbox (R18) or was
/// disconnected (R19: no integration of the thread's mailbox). `integrations`
/// are those of the thread's mailbox; with no thread known, nothing is taken
/// away on its account.
pub fn r13_r18_still_synced(
    routes: &[ThreadRoute],
    thread: Option<&Thread>,
    integrations: &[Integration],
) -> Vec<ThreadRoute> {
    let same = |a: &ThreadRoute, location: &str, user: &str| {
        a.location_id == location && a.user_id == user
    };
    routes
        .iter()
        .filter(|route| {
            thread.is_none_or(|thread| {
                thread
                    .routes
                    .iter()
                    .any(|kept| same(kept, &route.location_id, &route.user_id))
                    && integrations.iter().any(|integration| {
                        integration.mailbox == thread.mailbox
                            && same(route, &integration.location_id, &integration.user_id)
                    })
            })
        })
        .cloned()
        .collect()
}

/// R10: where several contacts of a location share an address, the one created
/// first wins (ties broken by id so the choice is stable).
fn r10_first_created<'c>(
    contacts: &'c [Contact],
    integration: &Integration,
    address: &str,
) -> Option<&'c Contact> {
    contacts
        .iter()
        .filter(|c| c.location_id == integration.location_id)
        .filter(|c| c.is_assigned_to(&integration.user_id))
        .filter(|c| c.has_email(address))
        .min_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ANSWERED_IDS_FILED, EmailAddress, FolderCursor};
    use chrono::{TimeZone, Utc};

    const MAILBOX: &str = "me@example.test";

    fn addr(email: &str) -> EmailAddress {
        EmailAddress {
            email: email.into(),
            name: None,
        }
    }

    fn contact(location: &str, id: &str, email: &str, users: &[&str], created_day: u32) -> Contact {
        Contact {
            location_id: location.into(),
            id: id.into(),
            emails: vec![email.into()],
            name: None,
            assigned_user_ids: users.iter().map(|u| u.to_string()).collect(),
            created_at: Utc.with_ymd_and_hms(2026, 1, created_day, 0, 0, 0).unwrap(),
        }
    }

    fn integration(location: &str, user: &str, inbox_start: u32) -> Integration {
        Integration {
            location_id: location.into(),
            user_id: user.into(),
            mailbox: MAILBOX.into(),
            connected_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            baseline: vec![
                (FolderRole::Inbox, FolderCursor::new(1, inbox_start)),
                (FolderRole::Sent, FolderCursor::new(1, 1)),
            ],
            smart_bcc_address: "bcc@bridge.test".into(),
        }
    }

    fn message(from: &str, to: &[&str], cc: &[&str], bcc: &[&str]) -> Message {
        Message {
            from: Some(addr(from)),
            to: to.iter().map(|a| addr(a)).collect(),
            cc: cc.iter().map(|a| addr(a)).collect(),
            bcc: bcc.iter().map(|a| addr(a)).collect(),
            message_id: Some("<m@x>".into()),
            ..Message::default()
        }
    }

    /// (location, user, contact) triples of the deliveries, or the ignore reason.
    fn outcome(
        message: &Message,
        folder: FolderRole,
        uid: u32,
        integrations: &[Integration],
        contacts: &[Contact],
        thread: Option<&Thread>,
    ) -> Result<Vec<(String, String, String, Direction)>, IgnoreReason> {
        let routing = route(
            Incoming {
                message,
                folder,
                uid_validity: 1,
                uid,
                received_at: None,
                sent_by_crm: false,
            },
            Directory {
                mailbox: MAILBOX,
                integrations,
                contacts,
                already_synced: &[],
                logged_by_envelope: &[],
                smart_addresses: &[],
            },
            thread,
        );
        match routing {
            Routing::Ignore(reason) => Err(reason),
            Routing::Deliver { deliveries, .. } => Ok(deliveries
                .into_iter()
                .map(|d| {
                    (
                        d.route.location_id,
                        d.route.user_id,
                        d.route.contact_id,
                        d.direction,
                    )
                })
                .collect()),
        }
    }

    fn to(
        location: &str,
        user: &str,
        contact: &str,
        direction: Direction,
    ) -> (String, String, String, Direction) {
        (location.into(), user.into(), contact.into(), direction)
    }

    struct Case {
        name: &'static str,
        message: Message,
        folder: FolderRole,
        uid: u32,
        integrations: Vec<Integration>,
        contacts: Vec<Contact>,
        expect: Result<Vec<(String, String, String, Direction)>, IgnoreReason>,
    }

    fn run(cases: Vec<Case>) {
        for case in cases {
            let got = outcome(
                &case.message,
                case.folder,
                case.uid,
                &case.integrations,
                &case.contacts,
                None,
            );
            assert_eq!(got, case.expect, "case: {}", case.name);
        }
    }

    #[test]
    fn r02_mail_older_than_the_connection_never_syncs() {
        let ann = contact("L1", "c1", "ann@x.test", &["u1"], 1);
        run(vec![
            Case {
                name: "uid below the baseline",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 9,
                integrations: vec![integration("L1", "u1", 10)],
                contacts: vec![ann.clone()],
                expect: Err(IgnoreReason::BeforeConnect),
            },
            Case {
                name: "uid at the baseline",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 10,
                integrations: vec![integration("L1", "u1", 10)],
                contacts: vec![ann],
                expect: Ok(vec![to("L1", "u1", "c1", Direction::Inbound)]),
            },
        ]);
    }

    #[test]
    fn r02_after_the_uids_were_renumbered_the_arrival_time_decides() {
        let integrations = vec![integration("L1", "u1", 10)];
        let contacts = vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)];
        let message = message("ann@x.test", &[MAILBOX], &[], &[]);
        // The integration was connected on 2026-01-01 at UIDVALIDITY 1.
        let routing = |received_at| {
            route(
                Incoming {
                    message: &message,
                    folder: FolderRole::Inbox,
                    uid_validity: 2,
                    uid: 3,
                    received_at,
                    sent_by_crm: false,
                },
                Directory {
                    mailbox: MAILBOX,
                    integrations: &integrations,
                    contacts: &contacts,
                    already_synced: &[],
                    logged_by_envelope: &[],
                    smart_addresses: &[],
                },
                None,
            )
        };
        let day = |year, day| Some(Utc.with_ymd_and_hms(year, 1, day, 0, 0, 0).unwrap());
        assert_eq!(
            routing(day(2025, 15)),
            Routing::Ignore(IgnoreReason::BeforeConnect),
            "received in 2025: before the connect"
        );
        assert!(matches!(routing(day(2026, 2)), Routing::Deliver { .. }));
        assert!(
            matches!(routing(None), Routing::Deliver { .. }),
            "no date: not dropped"
        );
    }

    #[test]
    fn r03_inbound_only_from_contacts_assigned_to_the_user() {
        run(vec![
            Case {
                name: "assigned contact",
                message: message("Ann@X.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Ok(vec![to("L1", "u1", "c1", Direction::Inbound)]),
            },
            Case {
                name: "stranger",
                message: message("eve@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Err(IgnoreReason::SenderNotContact),
            },
            Case {
                name: "contact assigned to another user",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u2"], 1)],
                expect: Err(IgnoreReason::SenderNotContact),
            },
            Case {
                name: "contact of another location",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L2", "c1", "ann@x.test", &["u1"], 1)],
                expect: Err(IgnoreReason::SenderNotContact),
            },
            Case {
                name: "no From",
                message: Message::default(),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![],
                expect: Err(IgnoreReason::NoSender),
            },
            Case {
                name: "the user's own mail in the inbox",
                message: message(MAILBOX, &["ann@x.test"], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Err(IgnoreReason::OwnMessageInInbox),
            },
            Case {
                name: "filed by a server rule in a listed folder",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::listed("Clients"),
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Ok(vec![to("L1", "u1", "c1", Direction::Inbound)]),
            },
            Case {
                name: "the user's own mail in a listed folder (synced from Sent)",
                message: message(MAILBOX, &["ann@x.test"], &[], &[]),
                folder: FolderRole::listed("Clients"),
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Err(IgnoreReason::OwnMessageInInbox),
            },
            Case {
                name: "no integration",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Err(IgnoreReason::NoIntegration),
            },
        ]);
    }

    #[test]
    fn r04_mail_sent_from_the_mailbox_to_a_contact_is_outbound() {
        run(vec![
            Case {
                name: "sent to a contact",
                message: message(MAILBOX, &["ann@x.test"], &[], &[]),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Ok(vec![to("L1", "u1", "c1", Direction::Outbound)]),
            },
            Case {
                name: "sent to a stranger",
                message: message(MAILBOX, &["eve@x.test"], &[], &[]),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Err(IgnoreReason::NoRecipientContact),
            },
        ]);
    }

    #[test]
    fn r05_the_crms_own_send_in_sent_is_not_reported_again() {
        let integrations = vec![integration("L1", "u1", 1)];
        let contacts = vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)];
        let message = message(MAILBOX, &["ann@x.test"], &[], &[]);
        let routing = |sent_by_crm| {
            route(
                Incoming {
                    message: &message,
                    folder: FolderRole::Sent,
                    uid_validity: 1,
                    uid: 1,
                    received_at: None,
                    sent_by_crm,
                },
                Directory {
                    mailbox: MAILBOX,
                    integrations: &integrations,
                    contacts: &contacts,
                    already_synced: &[],
                    logged_by_envelope: &[],
                    smart_addresses: &[],
                },
                None,
            )
        };
        assert_eq!(routing(true), Routing::Ignore(IgnoreReason::SentByCrm));
        assert!(matches!(routing(false), Routing::Deliver { .. }));
    }

    #[test]
    fn r21_an_integration_that_already_received_the_message_does_not_get_it_again() {
        let integrations = vec![integration("L1", "u1", 1), integration("L2", "u2", 1)];
        let contacts = vec![
            contact("L1", "c1", "ann@x.test", &["u1"], 1),
            contact("L2", "c2", "ann@x.test", &["u2"], 1),
        ];
        let message = message("ann@x.test", &[MAILBOX], &[], &[]);
        let routing = |already_synced: &[(String, String)]| {
            route(
                Incoming {
                    message: &message,
                    folder: FolderRole::Inbox,
                    uid_validity: 1,
                    uid: 9,
                    received_at: None,
                    sent_by_crm: false,
                },
                Directory {
                    mailbox: MAILBOX,
                    integrations: &integrations,
                    contacts: &contacts,
                    already_synced,
                    logged_by_envelope: &[],
                    smart_addresses: &[],
                },
                None,
            )
        };
        let pair = |l: &str, u: &str| (l.to_string(), u.to_string());
        let locations = |routing: Routing| match routing {
            Routing::Deliver { deliveries, .. } => deliveries
                .into_iter()
                .map(|d| d.route.location_id)
                .collect::<Vec<_>>(),
            Routing::Ignore(reason) => panic!("ignored: {reason}"),
        };
        assert_eq!(locations(routing(&[])), vec!["L1", "L2"]);
        assert_eq!(locations(routing(&[pair("L1", "u1")])), vec!["L2"]);
        assert_eq!(
            routing(&[pair("L1", "u1"), pair("L2", "u2")]),
            Routing::Ignore(IgnoreReason::AlreadySynced)
        );
        // Another user of the same location is another integration.
        assert_eq!(locations(routing(&[pair("L1", "u9")])), vec!["L1", "L2"]);
    }

    #[test]
    fn r07_cc_and_bcc_contacts_match_but_nothing_is_created() {
        run(vec![
            Case {
                name: "only contact is in Cc",
                message: message(MAILBOX, &["eve@x.test"], &["ann@x.test"], &[]),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Ok(vec![to("L1", "u1", "c1", Direction::Outbound)]),
            },
            Case {
                name: "only contact is in Bcc",
                message: message(MAILBOX, &["eve@x.test"], &[], &["ann@x.test"]),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
                expect: Ok(vec![to("L1", "u1", "c1", Direction::Outbound)]),
            },
            Case {
                name: "no contact anywhere: nothing created, nothing synced",
                message: message(MAILBOX, &["eve@x.test"], &["bob@x.test"], &[]),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![],
                expect: Err(IgnoreReason::NoRecipientContact),
            },
        ]);
    }

    /// The `contact_ids` of each delivery.
    fn named(message: &Message, folder: FolderRole, contacts: &[Contact]) -> Vec<Vec<String>> {
        let integrations = [integration("L1", "u1", 1), integration("L2", "u1", 1)];
        match route(
            Incoming {
                message,
                folder,
                uid_validity: 1,
                uid: 1,
                received_at: None,
                sent_by_crm: false,
            },
            Directory {
                mailbox: MAILBOX,
                integrations: &integrations,
                contacts,
                already_synced: &[],
                logged_by_envelope: &[],
                smart_addresses: &[],
            },
            None,
        ) {
            Routing::Deliver { deliveries, .. } => {
                deliveries.into_iter().map(|d| d.contact_ids).collect()
            }
            Routing::Ignore(reason) => panic!("ignored: {reason}"),
        }
    }

    #[test]
    fn r07_r08_every_contact_the_message_names_is_listed_owner_first() {
        let contacts = vec![
            contact("L1", "c-ann", "ann@x.test", &["u1"], 2),
            contact("L1", "c-bob", "bob@x.test", &["u1"], 1),
            contact("L1", "c-cat", "cat@x.test", &["u1"], 3),
            contact("L1", "c-unassigned", "dan@x.test", &["u2"], 1),
            contact("L2", "c-bob-l2", "bob@x.test", &["u1"], 1),
        ];
        let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: Vec<(&str, Message, FolderRole, Vec<Vec<String>>)> = vec![
            (
                "a cc'd contact is named after the owner; one not assigned to the user is not",
                message("ann@x.test", &[MAILBOX], &["bob@x.test", "dan@x.test"], &[]),
                FolderRole::Inbox,
                vec![ids(&["c-ann", "c-bob"])],
            ),
            (
                "sent to several: the first To contact owns it, every other contact follows, Bcc too",
                message(
                    MAILBOX,
                    &["eve@x.test", "cat@x.test"],
                    &["ann@x.test"],
                    &["bob@x.test"],
                ),
                FolderRole::Sent,
                // L2 knows only bob: the message is theirs too (R4), under him.
                vec![ids(&["c-cat", "c-ann", "c-bob"]), ids(&["c-bob-l2"])],
            ),
            (
                "each location names its own contacts (R11 fan-out)",
                message("bob@x.test", &[MAILBOX, "cat@x.test"], &[], &[]),
                FolderRole::Inbox,
                vec![ids(&["c-bob", "c-cat"]), ids(&["c-bob-l2"])],
            ),
        ];
        for (name, message, folder, expected) in cases {
            assert_eq!(named(&message, folder, &contacts), expected, "{name}");
        }
    }

    #[test]
    fn r16_a_forward_goes_to_the_contact_it_is_sent_to_not_the_thread_it_came_from() {
        let contacts = vec![
            contact("L1", "c-ann", "ann@x.test", &["u1"], 1),
            contact("L1", "c-bob", "bob@x.test", &["u1"], 2),
        ];
        let anns_thread = Thread {
            id: "thr_ann".into(),
            mailbox: MAILBOX.into(),
            routes: vec![ThreadRoute {
                location_id: "L1".into(),
                user_id: "u1".into(),
                contact_id: "c-ann".into(),
            }],
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            message_ids: vec!["<from-ann@x>".into()],
            subject: Some("invoice".into()),
        };
        let sent = |subject: &str, to: &str| Message {
            subject: Some(subject.into()),
            references: vec!["<from-ann@x>".into()],
            ..message(MAILBOX, &[to], &[], &[])
        };
        let decide = |message: &Message| {
            route(
                Incoming {
                    message,
                    folder: FolderRole::Sent,
                    uid_validity: 1,
                    uid: 1,
                    received_at: None,
                    sent_by_crm: false,
                },
                Directory {
                    mailbox: MAILBOX,
                    integrations: &[integration("L1", "u1", 1)],
                    contacts: &contacts,
                    already_synced: &[],
                    logged_by_envelope: &[],
                    smart_addresses: &[],
                },
                Some(&anns_thread),
            )
        };
        let cases: Vec<(&str, Message, ThreadDecision, Option<&str>)> = vec![
            (
                "Gmail's forward of ann's mail to bob: bob's conversation, a thread of its own",
                sent("Fwd: invoice", "bob@x.test"),
                ThreadDecision::Start,
                Some("c-bob"),
            ),
            (
                "Outlook's FW: to bob, the same",
                sent("FW: invoice", "bob@x.test"),
                ThreadDecision::Start,
                Some("c-bob"),
            ),
            (
                "a forward back to ann stays in her thread",
                sent("Fwd: invoice", "ann@x.test"),
                ThreadDecision::Continue {
                    thread_id: "thr_ann".into(),
                },
                Some("c-ann"),
            ),
            (
                "a reply (not a forward) to bob in ann's thread stays in the thread (R6)",
                sent("Re: invoice", "bob@x.test"),
                ThreadDecision::Continue {
                    thread_id: "thr_ann".into(),
                },
                Some("c-ann"),
            ),
        ];
        for (name, message, thread, owner) in cases {
            match decide(&message) {
                Routing::Deliver {
                    thread: decided,
                    deliveries,
                    ..
                } => {
                    assert_eq!(decided, thread, "{name}");
                    assert_eq!(
                        deliveries[0].route.contact_id.as_str(),
                        owner.unwrap(),
                        "{name}"
                    );
                    assert_eq!(deliveries[0].direction, Direction::Outbound, "{name}");
                }
                Routing::Ignore(reason) => panic!("{name}: ignored ({reason})"),
            }
        }
        // A forward of ann's mail to a stranger is not the contact's business.
        assert_eq!(
            decide(&sent("Fwd: invoice", "eve@x.test")),
            Routing::Ignore(IgnoreReason::NoRecipientContact)
        );
    }

    #[test]
    fn r15_auto_bcc_logs_mail_sent_with_the_smart_address_and_creates_to_recipients() {
        let contacts = vec![contact("L1", "c-ann", "ann@x.test", &["u1"], 1)];
        let smart = "bcc@bridge.test";
        let mut l2 = integration("L2", "u1", 1);
        l2.smart_bcc_address = "other-bcc@bridge.test".into();
        let integrations = vec![integration("L1", "u1", 1), l2];
        let decide = |message: &Message, folder: FolderRole| {
            route(
                Incoming {
                    message,
                    folder,
                    uid_validity: 1,
                    uid: 1,
                    received_at: None,
                    sent_by_crm: false,
                },
                Directory {
                    mailbox: MAILBOX,
                    integrations: &integrations,
                    contacts: &contacts,
                    already_synced: &[],
                    logged_by_envelope: &[],
                    smart_addresses: &[],
                },
                None,
            )
        };
        let named = |email: &str, name: &str| EmailAddress {
            email: email.into(),
            name: Some(name.into()),
        };
        let new_id = auto_contact_id("L1", "new@x.test");

        // In Bcc: the new To recipient is created and owns the conversation;
        // the known one is named; the Cc stranger is not created (R7).
        let mut logged = message(MAILBOX, &[], &["eve@x.test"], &[smart]);
        logged.to = vec![named("New@X.test", "New Person"), addr("ann@x.test")];
        match decide(&logged, FolderRole::Sent) {
            Routing::Deliver {
                thread,
                deliveries,
                new_contacts,
            } => {
                assert_eq!(thread, ThreadDecision::Start);
                assert_eq!(
                    new_contacts,
                    vec![NewContact {
                        location_id: "L1".into(),
                        user_id: "u1".into(),
                        id: new_id.clone(),
                        email: "new@x.test".into(),
                        name: Some("New Person".into()),
                    }]
                );
                assert_eq!(
                    deliveries.len(),
                    1,
                    "L2's smart address is not on it: {deliveries:?}"
                );
                assert_eq!(deliveries[0].route.contact_id, new_id);
                assert_eq!(deliveries[0].origin, Origin::AutoBcc);
                assert_eq!(deliveries[0].direction, Direction::Outbound);
                assert_eq!(
                    deliveries[0].contact_ids,
                    vec![new_id.clone(), "c-ann".to_string()]
                );
            }
            other => panic!("not logged: {other:?}"),
        }

        // In Cc works the same; a known first To owns it and nothing is created.
        let known_first = message(MAILBOX, &["ann@x.test"], &[smart], &[]);
        match decide(&known_first, FolderRole::Sent) {
            Routing::Deliver {
                deliveries,
                new_contacts,
                ..
            } => {
                assert!(new_contacts.is_empty());
                assert_eq!(deliveries[0].route.contact_id, "c-ann");
                assert_eq!(deliveries[0].origin, Origin::AutoBcc);
            }
            other => panic!("not logged: {other:?}"),
        }

        // Without the smart address, a stranger creates nothing (R4, R7).
        assert_eq!(
            decide(
                &message(MAILBOX, &["new@x.test"], &[], &[]),
                FolderRole::Sent
            ),
            Routing::Ignore(IgnoreReason::NoRecipientContact)
        );
        // A forged address of the same shape is no smart address.
        assert_eq!(
            decide(
                &message(MAILBOX, &["new@x.test"], &[], &["bcc2@bridge.test"]),
                FolderRole::Sent
            ),
            Routing::Ignore(IgnoreReason::NoRecipientContact)
        );
        // Mail received with the address on it was not sent by the user.
        assert_eq!(
            decide(
                &message("new@x.test", &[MAILBOX], &[smart], &[]),
                FolderRole::Inbox
            ),
            Routing::Ignore(IgnoreReason::SenderNotContact)
        );
    }

    /// The seed article's FAQ, question by question, each as the rule that
    /// answers it decides it. (Removing an account and changed credentials
    /// are lifecycle, not routing: `lifecycle.rs` covers R19 and R20.)
    #[test]
    fn faq_the_seed_articles_questions_answered_one_by_one() {
        let ann = contact("L1", "c-ann", "ann@x.test", &["u1"], 1);
        let bob = contact("L1", "c-bob", "bob@x.test", &["u1"], 2);
        let ann_l2 = contact("L2", "c-ann-l2", "ann@x.test", &["u1"], 1);
        let ann_twin = contact("L1", "c-ann-later", "ann@x.test", &["u1"], 5);
        let one = vec![integration("L1", "u1", 1)];
        let two = vec![integration("L1", "u1", 1), integration("L2", "u1", 1)];
        let anns_thread = Thread {
            id: "thr_ann".into(),
            mailbox: MAILBOX.into(),
            routes: vec![ThreadRoute {
                location_id: "L1".into(),
                user_id: "u1".into(),
                contact_id: "c-ann".into(),
            }],
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            message_ids: vec!["<first@x>".into()],
            subject: None,
        };
        let reply_in_thread = Message {
            in_reply_to: Some("<first@x>".into()),
            ..message("eve@x.test", &[MAILBOX], &[], &[])
        };
        let forward = Message {
            subject: Some("Fwd: the offer".into()),
            ..message(MAILBOX, &["bob@x.test"], &[], &[])
        };
        type Expect = Result<Vec<(String, String, String, Direction)>, IgnoreReason>;
        /// (question, message, folder, uid, integrations, contacts, thread, expected)
        type Faq<'t> = (
            &'static str,
            Message,
            FolderRole,
            u32,
            Vec<Integration>,
            Vec<Contact>,
            Option<&'t Thread>,
            Expect,
        );
        let cases: Vec<Faq<'_>> = vec![
            (
                "What happens to emails received from existing contacts? Reflected in the CRM (R3)",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                5,
                one.clone(),
                vec![ann.clone()],
                None,
                Ok(vec![to("L1", "u1", "c-ann", Direction::Inbound)]),
            ),
            (
                "…and from anyone else? Not forwarded (R3)",
                message("eve@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                5,
                one.clone(),
                vec![ann.clone()],
                None,
                Err(IgnoreReason::SenderNotContact),
            ),
            (
                "Do new emails get synced after an account is removed? No (R19)",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                5,
                vec![],
                vec![ann.clone()],
                None,
                Err(IgnoreReason::NoIntegration),
            ),
            (
                "Will existing contacts' past emails sync? No, only after connecting (R2)",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                5,
                vec![integration("L1", "u1", 10)],
                vec![ann.clone()],
                None,
                Err(IgnoreReason::BeforeConnect),
            ),
            (
                "A new email of an existing thread shows in the same thread, from anyone (R6)",
                reply_in_thread,
                FolderRole::Inbox,
                5,
                one.clone(),
                vec![ann.clone()],
                Some(&anns_thread),
                Ok(vec![to("L1", "u1", "c-ann", Direction::Inbound)]),
            ),
            (
                "Emails sent from Gmail appear under the contact's conversation (R4)",
                message(MAILBOX, &["ann@x.test"], &[], &[]),
                FolderRole::Sent,
                5,
                one.clone(),
                vec![ann.clone()],
                None,
                Ok(vec![to("L1", "u1", "c-ann", Direction::Outbound)]),
            ),
            (
                "cc/bcc: a cc'd contact gets it under their record; no contact is created for Cc (R7)",
                message(MAILBOX, &["eve@x.test"], &["ann@x.test", "new@x.test"], &[]),
                FolderRole::Sent,
                5,
                one.clone(),
                vec![ann.clone()],
                None,
                Ok(vec![to("L1", "u1", "c-ann", Direction::Outbound)]),
            ),
            (
                "A contact emails someone else but includes the user: under that contact (R8)",
                message("ann@x.test", &["eve@x.test"], &[MAILBOX], &[]),
                FolderRole::Inbox,
                5,
                one.clone(),
                vec![ann.clone()],
                None,
                Ok(vec![to("L1", "u1", "c-ann", Direction::Inbound)]),
            ),
            (
                "Multiple To recipients: the first contact gets the conversation (R9)",
                message(
                    MAILBOX,
                    &["eve@x.test", "bob@x.test", "ann@x.test"],
                    &[],
                    &[],
                ),
                FolderRole::Sent,
                5,
                one.clone(),
                vec![ann.clone(), bob.clone()],
                None,
                Ok(vec![to("L1", "u1", "c-bob", Direction::Outbound)]),
            ),
            (
                "The same contact in several locations: their email reaches every location (R11)",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                5,
                two.clone(),
                vec![ann.clone(), ann_l2.clone()],
                None,
                Ok(vec![
                    to("L1", "u1", "c-ann", Direction::Inbound),
                    to("L2", "u1", "c-ann-l2", Direction::Inbound),
                ]),
            ),
            (
                "…but replies in a thread the CRM started in L1 stay in L1 (R12)",
                Message {
                    in_reply_to: Some("<first@x>".into()),
                    ..message("ann@x.test", &[MAILBOX], &[], &[])
                },
                FolderRole::Inbox,
                5,
                two.clone(),
                vec![ann.clone(), ann_l2.clone()],
                Some(&anns_thread),
                Ok(vec![to("L1", "u1", "c-ann", Direction::Inbound)]),
            ),
            (
                "A forwarded email to an existing contact is a sent email of that contact (R16)",
                forward,
                FolderRole::Sent,
                5,
                one.clone(),
                vec![ann.clone(), bob.clone()],
                None,
                Ok(vec![to("L1", "u1", "c-bob", Direction::Outbound)]),
            ),
            (
                "Duplicate contacts with one address: the first created gets it (R10)",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                5,
                one.clone(),
                vec![ann_twin.clone(), ann.clone()],
                None,
                Ok(vec![to("L1", "u1", "c-ann", Direction::Inbound)]),
            ),
            (
                "Auto BCC: the smart address on a sent email creates the To contact (R15)",
                message(MAILBOX, &["new@x.test"], &[], &["bcc@bridge.test"]),
                FolderRole::Sent,
                5,
                one.clone(),
                vec![],
                None,
                Ok(vec![to(
                    "L1",
                    "u1",
                    &auto_contact_id("L1", "new@x.test"),
                    Direction::Outbound,
                )]),
            ),
        ];
        for (question, message, folder, uid, integrations, contacts, thread, expect) in cases {
            let got = outcome(&message, folder, uid, &integrations, &contacts, thread);
            assert_eq!(got, expect, "{question}");
        }
        // "What happens to sent emails from the CRM?" Logged in Sent, and
        // not reported again as the user's own mail (R5).
        let crm_copy = message(MAILBOX, &["ann@x.test"], &[], &[]);
        let routing = route(
            Incoming {
                message: &crm_copy,
                folder: FolderRole::Sent,
                uid_validity: 1,
                uid: 5,
                received_at: None,
                sent_by_crm: true,
            },
            Directory {
                mailbox: MAILBOX,
                integrations: &one,
                contacts: &[ann],
                already_synced: &[],
                logged_by_envelope: &[],
                smart_addresses: &[],
            },
            None,
        );
        assert_eq!(routing, Routing::Ignore(IgnoreReason::SentByCrm));
    }

    /// R15: another integration's smart address in To is no person: it is
    /// never created as a contact.
    #[test]
    fn r15_no_smart_address_is_ever_created_as_a_contact() {
        let integrations = [integration("L1", "u1", 1)];
        let mut logged = message(MAILBOX, &["other-bcc@bridge.test", "new@x.test"], &[], &[]);
        logged.bcc = vec![addr("bcc@bridge.test")];
        let smart_addresses = [
            "other-bcc@bridge.test".to_string(),
            "bcc@bridge.test".to_string(),
        ];
        let routing = route(
            Incoming {
                message: &logged,
                folder: FolderRole::Sent,
                uid_validity: 1,
                uid: 1,
                received_at: None,
                sent_by_crm: false,
            },
            Directory {
                mailbox: MAILBOX,
                integrations: &integrations,
                contacts: &[],
                already_synced: &[],
                logged_by_envelope: &[],
                smart_addresses: &smart_addresses,
            },
            None,
        );
        let Routing::Deliver {
            new_contacts,
            deliveries,
            ..
        } = routing
        else {
            panic!("not logged: {routing:?}");
        };
        let created: Vec<&str> = new_contacts.iter().map(|c| c.email.as_str()).collect();
        assert_eq!(created, ["new@x.test"]);
        assert_eq!(
            deliveries[0].route.contact_id,
            auto_contact_id("L1", "new@x.test")
        );
    }

    #[test]
    fn r08_contact_writing_to_others_with_the_user_in_cc_syncs() {
        run(vec![Case {
            name: "user in Cc",
            message: message("ann@x.test", &["eve@x.test"], &[MAILBOX], &[]),
            folder: FolderRole::Inbox,
            uid: 1,
            integrations: vec![integration("L1", "u1", 1)],
            contacts: vec![contact("L1", "c1", "ann@x.test", &["u1"], 1)],
            expect: Ok(vec![to("L1", "u1", "c1", Direction::Inbound)]),
        }]);
    }

    #[test]
    fn r09_first_to_contact_owns_the_conversation() {
        let contacts = vec![
            contact("L1", "c-bob", "bob@x.test", &["u1"], 1),
            contact("L1", "c-ann", "ann@x.test", &["u1"], 2),
            contact("L1", "c-cat", "cat@x.test", &["u1"], 3),
        ];
        run(vec![
            Case {
                name: "To order decides, not creation order",
                message: message(
                    MAILBOX,
                    &["eve@x.test", "ann@x.test", "bob@x.test"],
                    &[],
                    &[],
                ),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: contacts.clone(),
                expect: Ok(vec![to("L1", "u1", "c-ann", Direction::Outbound)]),
            },
            Case {
                name: "To beats an earlier Cc",
                message: message(MAILBOX, &["cat@x.test"], &["bob@x.test"], &[]),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: contacts.clone(),
                expect: Ok(vec![to("L1", "u1", "c-cat", Direction::Outbound)]),
            },
            Case {
                name: "Cc beats Bcc",
                message: message(MAILBOX, &["eve@x.test"], &["cat@x.test"], &["bob@x.test"]),
                folder: FolderRole::Sent,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts,
                expect: Ok(vec![to("L1", "u1", "c-cat", Direction::Outbound)]),
            },
        ]);
    }

    #[test]
    fn r10_duplicate_contacts_first_created_wins() {
        run(vec![
            Case {
                name: "older contact wins whatever the list order",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![
                    contact("L1", "c-new", "ann@x.test", &["u1"], 5),
                    contact("L1", "c-old", "ann@x.test", &["u1"], 2),
                ],
                expect: Ok(vec![to("L1", "u1", "c-old", Direction::Inbound)]),
            },
            Case {
                name: "same creation time: lowest id",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![
                    contact("L1", "c-b", "ann@x.test", &["u1"], 2),
                    contact("L1", "c-a", "ann@x.test", &["u1"], 2),
                ],
                expect: Ok(vec![to("L1", "u1", "c-a", Direction::Inbound)]),
            },
            Case {
                name: "older contact not assigned to the user does not count",
                message: message("ann@x.test", &[MAILBOX], &[], &[]),
                folder: FolderRole::Inbox,
                uid: 1,
                integrations: vec![integration("L1", "u1", 1)],
                contacts: vec![
                    contact("L1", "c-old", "ann@x.test", &["u9"], 1),
                    contact("L1", "c-new", "ann@x.test", &["u1"], 5),
                ],
                expect: Ok(vec![to("L1", "u1", "c-new", Direction::Inbound)]),
            },
        ]);
    }

    #[test]
    fn r11_inbound_fans_out_to_every_location_where_the_sender_is_assigned() {
        run(vec![Case {
            name: "two of three locations",
            message: message("ann@x.test", &[MAILBOX], &[], &[]),
            folder: FolderRole::Inbox,
            uid: 1,
            integrations: vec![
                integration("L1", "u1", 1),
                integration("L2", "u1", 1),
                integration("L3", "u1", 1),
            ],
            contacts: vec![
                contact("L1", "c1", "ann@x.test", &["u1"], 1),
                contact("L2", "c2", "ann@x.test", &["u1"], 1),
                contact("L3", "c3", "ann@x.test", &["u7"], 1),
            ],
            expect: Ok(vec![
                to("L1", "u1", "c1", Direction::Inbound),
                to("L2", "u1", "c2", Direction::Inbound),
            ]),
        }]);
    }

    /// Issue 21: changes of a synced message go only where its thread still
    /// syncs.
    #[test]
    fn r13_r18_r19_changes_go_only_where_the_thread_still_syncs() {
        let forwarded = thread(&[("L1", "u1", "c1"), ("L2", "u2", "c2")]).routes;
        let both = [integration("L1", "u1", 1), integration("L2", "u2", 1)];
        let moved_away = Integration {
            mailbox: "other@example.test".into(),
            ..integration("L2", "u2", 1)
        };
        let locations = |routes: Vec<ThreadRoute>| -> Vec<String> {
            routes.into_iter().map(|r| r.location_id).collect()
        };
        /// (case, the thread now, the mailbox's integrations now, locations told)
        type Case = (
            &'static str,
            Option<Thread>,
            Vec<Integration>,
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            (
                "still synced to both",
                Some(thread(&[("L1", "u1", "c1"), ("L2", "u2", "c2")])),
                both.to_vec(),
                &["L1", "L2"],
            ),
            (
                "R13: pinned to L1 by a CRM reply",
                Some(thread(&[("L1", "u1", "c1")])),
                both.to_vec(),
                &["L1"],
            ),
            (
                "R18: L2's user now uses another mailbox",
                Some(thread(&[("L1", "u1", "c1"), ("L2", "u2", "c2")])),
                vec![integration("L1", "u1", 1), moved_away],
                &["L1"],
            ),
            (
                "R19: L2 disconnected",
                Some(thread(&[("L1", "u1", "c1"), ("L2", "u2", "c2")])),
                vec![integration("L1", "u1", 1)],
                &["L1"],
            ),
            (
                "no thread known: as forwarded",
                None,
                Vec::new(),
                &["L1", "L2"],
            ),
        ];
        for (name, thread, integrations, expected) in cases {
            let kept = r13_r18_still_synced(&forwarded, thread.as_ref(), integrations);
            assert_eq!(locations(kept), *expected, "{name}");
        }
    }

    fn thread(routes: &[(&str, &str, &str)]) -> Thread {
        Thread {
            id: "thr_1".into(),
            mailbox: MAILBOX.into(),
            routes: routes
                .iter()
                .map(|(l, u, c)| ThreadRoute {
                    location_id: l.to_string(),
                    user_id: u.to_string(),
                    contact_id: c.to_string(),
                })
                .collect(),
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            message_ids: vec![],
            subject: None,
        }
    }

    #[test]
    fn r06_later_messages_of_a_synced_thread_keep_its_thread_and_conversation() {
        let integrations = vec![integration("L1", "u1", 1)];
        let known = thread(&[("L1", "u1", "c1")]);
        let cases: Vec<(&str, Message, FolderRole, Result<Vec<_>, IgnoreReason>)> = vec![
            (
                "reply from a non-contact colleague in the thread",
                message("colleague@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                Ok(vec![to("L1", "u1", "c1", Direction::Inbound)]),
            ),
            (
                "the user's reply from the mailbox",
                message(MAILBOX, &["colleague@x.test"], &[], &[]),
                FolderRole::Sent,
                Ok(vec![to("L1", "u1", "c1", Direction::Outbound)]),
            ),
        ];
        for (name, message, folder, expect) in cases {
            let got = outcome(&message, folder, 1, &integrations, &[], Some(&known));
            assert_eq!(got, expect, "case: {name}");
            let routing = route(
                Incoming {
                    message: &message,
                    folder,
                    uid_validity: 1,
                    uid: 1,
                    received_at: None,
                    sent_by_crm: false,
                },
                Directory {
                    mailbox: MAILBOX,
                    integrations: &integrations,
                    contacts: &[],
                    already_synced: &[],
                    logged_by_envelope: &[],
                    smart_addresses: &[],
                },
                Some(&known),
            );
            assert!(
                matches!(routing, Routing::Deliver { thread: ThreadDecision::Continue { ref thread_id }, .. } if thread_id == "thr_1"),
                "case {name}: {routing:?}"
            );
        }
        let detached = thread(&[("L9", "u1", "c1")]);
        let got = outcome(
            &message("ann@x.test", &[MAILBOX], &[], &[]),
            FolderRole::Inbox,
            1,
            &integrations,
            &[],
            Some(&detached),
        );
        assert_eq!(
            got,
            Err(IgnoreReason::ThreadDetached),
            "thread of a gone integration"
        );
    }

    #[test]
    fn r12_a_crm_thread_stays_in_its_location_even_when_the_sender_is_a_contact_elsewhere() {
        let integrations = vec![integration("L1", "u1", 1), integration("L2", "u1", 1)];
        let contacts = vec![
            contact("L1", "c1", "ann@x.test", &["u1"], 1),
            contact("L2", "c2", "ann@x.test", &["u1"], 1),
        ];
        let crm_thread = thread(&[("L1", "u1", "c1")]);
        let got = outcome(
            &message("ann@x.test", &[MAILBOX], &[], &[]),
            FolderRole::Inbox,
            1,
            &integrations,
            &contacts,
            Some(&crm_thread),
        );
        assert_eq!(got, Ok(vec![to("L1", "u1", "c1", Direction::Inbound)]));
    }

    #[test]
    fn r13_a_crm_reply_pins_the_thread_to_its_location() {
        let route = |l: &str, c: &str| ThreadRoute {
            location_id: l.into(),
            user_id: "u1".into(),
            contact_id: c.into(),
        };
        let cases = vec![
            (
                "new thread",
                vec![],
                route("L1", "c1"),
                vec![route("L1", "c1")],
                vec![],
            ),
            (
                "fanned-out thread, reply from L1",
                vec![route("L1", "c1"), route("L2", "c2")],
                route("L1", "c1"),
                vec![route("L1", "c1")],
                vec![route("L2", "c2")],
            ),
            (
                "reply from L2 keeps L2's own conversation",
                vec![route("L1", "c1"), route("L2", "c2")],
                route("L2", "c9"),
                vec![route("L2", "c2")],
                vec![route("L1", "c1")],
            ),
        ];
        for (name, routes, sender, kept, detached) in cases {
            assert_eq!(
                r13_pin_thread(&routes, &sender),
                (kept, detached),
                "case: {name}"
            );
        }
    }

    #[test]
    fn r06_an_original_read_after_its_reply_joins_its_thread_as_if_read_first() {
        let one = vec![integration("L1", "u1", 1)];
        let two = vec![integration("L1", "u1", 1), integration("L2", "u1", 1)];
        let ann_in = |locations: &[&str]| -> Vec<Contact> {
            locations
                .iter()
                .map(|l| contact(l, "c-ann", "ann@x.test", &["u1"], 1))
                .collect()
        };
        let in_l1 = thread(&[("L1", "u1", "c1")]);
        let in_l9 = thread(&[("L9", "u1", "c1")]);
        // (joins the thread, deliveries) or why it is ignored.
        type Expected = Result<(bool, Vec<(String, String, String, Direction)>), IgnoreReason>;
        type JoinCase<'a> = (
            &'a str,
            Message,
            FolderRole,
            &'a [Integration],
            Vec<Contact>,
            &'a Thread,
            Expected,
        );
        let cases: Vec<JoinCase> = vec![
            (
                "a contact's original joins the reply's conversation",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                &one,
                ann_in(&["L1"]),
                &in_l1,
                Ok((true, vec![to("L1", "u1", "c1", Direction::Inbound)])),
            ),
            (
                "a stranger's original stays out, as it would read first (R3)",
                message("eve@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                &one,
                ann_in(&["L1"]),
                &in_l1,
                Err(IgnoreReason::SenderNotContact),
            ),
            (
                "the user's own original in Sent (R4)",
                message(MAILBOX, &["ann@x.test"], &[], &[]),
                FolderRole::Sent,
                &one,
                ann_in(&["L1"]),
                &in_l1,
                Ok((true, vec![to("L1", "u1", "c1", Direction::Outbound)])),
            ),
            (
                "admitted where the thread has no conversation: its own thread, as read first",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                &two,
                ann_in(&["L1", "L2"]),
                &in_l1,
                Ok((
                    false,
                    vec![
                        to("L1", "u1", "c-ann", Direction::Inbound),
                        to("L2", "u1", "c-ann", Direction::Inbound),
                    ],
                )),
            ),
            (
                "a thread that syncs nowhere here: nothing lost",
                message("ann@x.test", &[MAILBOX], &[], &[]),
                FolderRole::Inbox,
                &one,
                ann_in(&["L1"]),
                &in_l9,
                Ok((false, vec![to("L1", "u1", "c-ann", Direction::Inbound)])),
            ),
        ];
        for (name, message, folder, integrations, contacts, known, expect) in cases {
            let routing = route_linked(
                Incoming {
                    message: &message,
                    folder,
                    uid_validity: 1,
                    uid: 1,
                    received_at: None,
                    sent_by_crm: false,
                },
                Directory {
                    mailbox: MAILBOX,
                    integrations,
                    contacts: &contacts,
                    already_synced: &[],
                    logged_by_envelope: &[],
                    smart_addresses: &[],
                },
                Some((known, ThreadLink::AnsweredBy)),
            );
            let got = match &routing {
                Routing::Ignore(reason) => Err(*reason),
                Routing::Deliver {
                    thread, deliveries, ..
                } => {
                    let joins = *thread
                        == ThreadDecision::Continue {
                            thread_id: "thr_1".into(),
                        };
                    Ok((
                        joins,
                        deliveries
                            .iter()
                            .map(|d| {
                                (
                                    d.route.location_id.clone(),
                                    d.route.user_id.clone(),
                                    d.route.contact_id.clone(),
                                    d.direction,
                                )
                            })
                            .collect(),
                    ))
                }
            };
            assert_eq!(got, expect, "case: {name}");
        }
    }

    #[test]
    fn r06_r16_a_synced_message_files_what_it_answers_unless_it_forwards() {
        let reply = Message {
            subject: Some("Re: offer".into()),
            in_reply_to: Some("<a@x>".into()),
            references: vec!["<a@x>".into()],
            ..message("ann@x.test", &[MAILBOX], &[], &[])
        };
        let forward = Message {
            subject: Some("Fwd: offer".into()),
            ..reply.clone()
        };
        assert_eq!(answered_ids(&reply), vec!["<a@x>"]);
        assert!(answered_ids(&forward).is_empty());
    }

    #[test]
    fn r06_answered_ids_are_bounded_keep_the_root_and_never_the_own_id() {
        let references: Vec<String> = (0..100).map(|n| format!("<r{n}@x>")).collect();
        let m = Message {
            message_id: Some("<own@x>".into()),
            in_reply_to: Some("<r99@x>".into()),
            // A hostile message lists its own id among what it answers.
            references: references
                .iter()
                .cloned()
                .chain(["<own@x>".to_string()])
                .collect(),
            ..Message::default()
        };
        let parents = m.parent_ids();
        assert!(parents.len() <= ANSWERED_IDS_FILED, "{}", parents.len());
        assert_eq!(parents.first().map(String::as_str), Some("<r99@x>"));
        assert!(parents.contains(&"<r98@x>".to_string()), "newest kept");
        assert!(parents.contains(&"<r0@x>".to_string()), "root kept");
        assert!(!parents.contains(&"<r50@x>".to_string()), "middle dropped");
        assert!(!parents.contains(&"<own@x>".to_string()));
        // Looking a thread up still tries every reference.
        assert!(m.thread_keys().contains(&"<r50@x>".to_string()));
    }

    #[test]
    fn r06_thread_keys_prefer_in_reply_to_then_references_newest_first() {
        let m = Message {
            message_id: Some("<c@x>".into()),
            in_reply_to: Some("<b@x>".into()),
            references: vec!["<a@x>".into(), "<b@x>".into()],
            ..Message::default()
        };
        assert_eq!(m.thread_keys(), vec!["<b@x>", "<a@x>", "<c@x>"]);
    }
}
