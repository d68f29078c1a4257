//! The user CLI: `flux publish`, `get`, `list`, `watch`, … — a small client of a running Flux
//! server, the Rust twin of the `flux.sh` skill script (same commands, same `FLUX_URL` and
//! `FLUX_TOKEN`).
//!
//! Owns the client subcommands' arguments, building each request (ids percent-encoded, missing
//! timestamps filled with the current time), printing the reply, and the exit code.
//! An `https://` URL (a TLS terminator in front of the plain-HTTP server) is reached over TLS,
//! `watch` over `wss://`, with `flux_tls`'s policy, the load generator's: the server's
//! certificate is checked against the system's roots plus `--ca-cert` (`FLUX_CA_CERT`), and
//! against the URL's host, always; a certificate not trusted is a connection failure that says
//! so and points to `--ca-cert`.
//! Invariants: on success the server's reply goes to stdout unchanged (one JSON document; for
//! `watch`, each message as sent, one a line; `batch-delete` repeated past the server's 10,000
//! a call prints the sum of its replies); on failure the server's `{"error": ...}` body, or
//! what went wrong locally, goes to stderr, and the exit code says which kind of failure it
//! was ([`EXIT_CODES_HELP`]). Nothing derived from input is unwrapped.
//! Called only by `main`, through [`run`].

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, Args, Subcommand};
use flux_tls::rustls::{self, ClientConfig, ClientConnection, StreamOwned};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::{Message, WebSocket};

/// The exit codes, as shown by `flux --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of the client commands:
  0  success: the server answered 2xx (its JSON reply is on stdout)
  1  the server answered with an error status (its {\"error\": ...} body is on stderr),
     or refused watch's subscription (its {\"type\":\"error\",...} message is on stderr)
  2  usage error: bad arguments, or a JSON argument that does not parse
  3  could not reach the server: connection refused, name lookup, timeout, connection lost,
     TLS certificate not trusted (for https://: give it or its CA with --ca-cert)";

/// Everything but RFC 3986 unreserved characters is encoded, as `flux.sh` does: an id's `/`
/// travels as `%2F`.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The server when neither `--url` nor `FLUX_URL` names one.
const DEFAULT_URL: &str = "http://127.0.0.1:3000";
/// Longest wait for the TCP connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for each read or write of a request (a large list can take a while).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a whole request may take, reply included: a server that trickles its reply a
/// byte at a time is given up on too.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for each read or write of `watch`'s WebSocket handshake: a few hundred bytes
/// any live server answers at once.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server is, which certificates to trust there, and how to authenticate (every
/// client command takes these). An empty value counts as unset, as `flux.sh`'s
/// `${FLUX_URL:-…}` has it: clap takes a variable set to "" as a value and has no setting to
/// ignore it, so [`ServerArgs::url`], [`ServerArgs::tls_config`] and [`Client::send`] skip
/// empty values.
#[derive(Args)]
pub struct ServerArgs {
    /// Base URL of the Flux server, http:// or https:// [default: http://127.0.0.1:3000].
    #[arg(long, env = "FLUX_URL")]
    url: Option<String>,
    /// For an https:// URL: PEM file of certificates to trust besides the system's (a private
    /// CA, or the server's self-signed certificate). The server's certificate and host name
    /// are always checked.
    #[arg(long, env = "FLUX_CA_CERT", value_name = "PATH")]
    ca_cert: Option<PathBuf>,
    /// Bearer token sent with writes (a namespace token, or the admin token), and with the
    /// admin commands when no admin token is given.
    #[arg(long, env = "FLUX_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Admin token, sent by `namespaces register`, `namespaces delete` and `admin-config`.
    #[arg(long, env = "FLUX_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

impl ServerArgs {
    /// The server's URL: `--url` or `FLUX_URL` unless empty, else [`DEFAULT_URL`].
    fn url(&self) -> &str {
        self.url
            .as_deref()
            .filter(|url| !url.is_empty())
            .unwrap_or(DEFAULT_URL)
    }

    /// The URL paths are added to: without a trailing `/`; `http://` or `https://`, and no
    /// query or fragment (the paths would land inside them).
    fn base_url(&self) -> Result<&str, Failure> {
        let base = self.url().trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Failure::Usage(format!(
                "--url {:?} must start with http:// or https://",
                self.url()
            )));
        }
        if base.contains(['?', '#']) {
            return Err(Failure::Usage(format!(
                "--url {:?} must not carry a query or a fragment: paths are added to it",
                self.url()
            )));
        }
        Ok(base)
    }

    /// The TLS client configuration for an `https://` URL: the system's roots plus
    /// `--ca-cert` (`flux_tls`'s policy, shared with `flux-loadtest`). A `--ca-cert` that
    /// cannot be read or holds no certificate is a usage error.
    fn tls_config(&self) -> Result<Arc<ClientConfig>, Failure> {
        let ca_cert = self
            .ca_cert
            .as_deref()
            .filter(|path| !path.as_os_str().is_empty());
        flux_tls::client_config(ca_cert)
            .map(Arc::new)
            .map_err(|error| Failure::Usage(format!("{error:#}")))
    }
}

/// The client subcommands, flattened beside `serve` in `flux`'s command list.
#[derive(Subcommand)]
pub enum Command {
    /// Publish one event; its timestamp is now (Unix milliseconds).
    #[command(after_help = EXIT_CODES_HELP)]
    Publish {
        /// Stream name, e.g. `sensors`.
        stream: String,
        /// Who observed it, e.g. `agent-01`.
        source: String,
        /// The entity, e.g. `acme/sensor-01`.
        entity_id: String,
        /// Properties to merge into the entity: a JSON object, e.g. '{"temperature":22.5}';
        /// `-` reads it from stdin (for objects too large for an argument).
        properties_json: String,
        /// Event id [default: assigned by the server].
        #[arg(long)]
        event_id: Option<String>,
        /// Optional event key, stored and returned in history.
        #[arg(long)]
        key: Option<String>,
        /// Optional schema name, stored and returned in history.
        #[arg(long)]
        schema: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Publish many events (events without a `timestamp` get the current time).
    #[command(after_help = EXIT_CODES_HELP)]
    Batch {
        /// A JSON array of events or {"events": [...]}; `-` reads it from stdin.
        json: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show one entity's current state.
    #[command(after_help = EXIT_CODES_HELP)]
    Get {
        entity_id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List entities, sorted by id.
    #[command(after_help = EXIT_CODES_HELP)]
    List {
        /// Only ids starting with this, e.g. `acme/site-3/`.
        #[arg(long, conflicts_with = "namespace")]
        prefix: Option<String>,
        /// Only ids in this namespace, e.g. `acme`.
        #[arg(long)]
        namespace: Option<String>,
        /// At most this many entities (a page).
        #[arg(long)]
        limit: Option<u64>,
        /// Start after this id (the last id of the previous page).
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete one entity.
    #[command(after_help = EXIT_CODES_HELP)]
    Delete {
        entity_id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete many entities: a whole namespace, every id with a prefix, or a list of ids.
    ///
    /// The server deletes at most 10,000 a call; while more match, the call is repeated, and
    /// the counts and errors printed are those of all calls.
    #[command(
        after_help = EXIT_CODES_HELP,
        group(ArgGroup::new("selector").required(true).args(["filter", "namespace", "prefix", "ids"]))
    )]
    BatchDelete {
        /// The request body itself, as `flux.sh batch-delete` takes it:
        /// `{"namespace": …}`, `{"prefix": …}` or `{"entity_ids": [...]}`.
        filter: Option<String>,
        /// Every entity of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Every entity whose id starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// These ids, comma-separated (an id holding a comma: give the filter JSON instead).
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<String>>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show an entity's stored events, newest first.
    #[command(after_help = EXIT_CODES_HELP)]
    History {
        entity_id: String,
        /// Only events accepted at or after this ISO-8601 time [server default: 24 h ago].
        #[arg(long)]
        since: Option<String>,
        /// At most this many events [server default: 100, max 500].
        #[arg(long)]
        limit: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print each state_update / entity_deleted message (WebSocket) as a JSON line.
    ///
    /// Runs until interrupted, or until `--count` messages have been printed.
    #[command(after_help = EXIT_CODES_HELP)]
    Watch {
        /// An entity id, `prefix/*` (any depth), or `*` for everything.
        pattern: String,
        /// Exit after this many update messages.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Register or look up namespaces (auth mode).
    #[command(subcommand)]
    Namespaces(NamespacesCommand),
    /// Read the runtime config (admin or namespace token), or change the fields given in JSON
    /// (admin token).
    #[command(after_help = EXIT_CODES_HELP)]
    AdminConfig {
        /// Fields to change, e.g. '{"rate_limit_per_namespace_per_minute":5000}'.
        json: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List connectors and their status, or show one.
    #[command(after_help = EXIT_CODES_HELP)]
    Connectors {
        name: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Check that the server and its log are up.
    #[command(after_help = EXIT_CODES_HELP)]
    Health {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
pub enum NamespacesCommand {
    /// Register a namespace and print its token (shown once). Sends the admin token if set.
    #[command(after_help = EXIT_CODES_HELP)]
    Register {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a namespace: id, creation time, entity count.
    #[command(after_help = EXIT_CODES_HELP)]
    Get {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a namespace and its token (admin token; its entities stay). Prints nothing.
    #[command(after_help = EXIT_CODES_HELP)]
    Delete {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Why a command failed; each kind has its own exit code.
enum Failure {
    /// The server answered with a non-2xx status; `body` is its reply, `retry_after` its
    /// `Retry-After` (a 429's seconds to wait).
    Http {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
    /// The arguments do not make a request.
    Usage(String),
    /// The server could not be reached, or the connection broke.
    Connection(String),
    /// The server refused `watch`'s subscription; its `{"type":"error",...}` message.
    Refused(String),
}

impl Failure {
    fn exit_code(&self) -> i32 {
        match self {
            Failure::Http { .. } | Failure::Refused(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Connection(_) => 3,
        }
    }

    fn report(&self) {
        let message = match self {
            Failure::Http { status, body, .. } if body.trim().is_empty() => {
                format!("flux: the server answered HTTP {status}")
            }
            Failure::Http { body, .. } => body.trim_end().to_string(),
            Failure::Refused(message) => message.clone(),
            Failure::Usage(reason) => format!("flux: {reason}"),
            Failure::Connection(reason) => format!("flux: {reason}"),
        };
        let _ = writeln!(std::io::stderr(), "{message}");
        if let Failure::Http {
            retry_after: Some(seconds),
            ..
        } = self
        {
            let _ = writeln!(std::io::stderr(), "flux: retry after {seconds} s");
        }
    }
}

/// Runs one client command and returns the process exit code.
pub fn run(command: Command) -> i32 {
    match execute(command) {
        Ok(()) => 0,
        Err(failure) => {
            failure.report();
            failure.exit_code()
        }
    }
}

fn execute(command: Command) -> Result<(), Failure> {
    match command {
        Command::Publish {
            stream,
            source,
            entity_id,
            properties_json,
            event_id,
            key,
            schema,
            server,
        } => {
            // Kept as raw JSON so values travel exactly as typed (numbers beyond 64 bits too).
            let properties_json = if properties_json == "-" {
                read_stdin()?
            } else {
                properties_json
            };
            let properties: Box<RawValue> = serde_json::from_str(properties_json.trim())
                .map_err(|e| Failure::Usage(format!("properties_json is not JSON: {e}")))?;
            if !properties.get().starts_with('{') {
                return Err(Failure::Usage(
                    "properties_json must be a JSON object, e.g. '{\"temperature\":22.5}'".into(),
                ));
            }
            let event = OutgoingEvent {
                stream: &stream,
                source: &source,
                timestamp: now_ms(),
                payload: OutgoingPayload {
                    entity_id: &entity_id,
                    properties: &properties,
                },
                event_id: event_id.as_deref(),
                key: key.as_deref(),
                schema: schema.as_deref(),
            };
            let body = serde_json::to_string(&event)
                .map_err(|e| Failure::Usage(format!("encoding the event: {e}")))?;
            let client = Client::new(&server)?;
            client.print("POST", "/api/events", Auth::Token, Some(&body))
        }
        Command::Batch { json, server } => {
            let text = if json == "-" { read_stdin()? } else { json };
            let body = fill_timestamps(&text)?;
            let client = Client::new(&server)?;
            client.print("POST", "/api/events/batch", Auth::Token, Some(&body))
        }
        Command::Get { entity_id, server } => {
            let path = entity_path(&entity_id)?;
            Client::new(&server)?.print("GET", &path, Auth::None, None)
        }
        Command::List {
            prefix,
            namespace,
            limit,
            after,
            server,
        } => {
            let limit = limit.map(|n| n.to_string());
            let query = query_string(&[
                ("prefix", prefix.as_deref()),
                ("namespace", namespace.as_deref()),
                ("limit", limit.as_deref()),
                ("after", after.as_deref()),
            ]);
            let path = format!("/api/state/entities{query}");
            Client::new(&server)?.print("GET", &path, Auth::None, None)
        }
        Command::Delete { entity_id, server } => {
            let path = entity_path(&entity_id)?;
            Client::new(&server)?.print("DELETE", &path, Auth::Token, None)
        }
        Command::BatchDelete {
            filter,
            namespace,
            prefix,
            ids,
            server,
        } => {
            let body = match (filter, namespace, prefix, ids) {
                // Sent as given: the server names what is wrong with a filter it refuses.
                (Some(filter), None, None, None) => parse_json("the filter", &filter)?,
                (None, Some(namespace), None, None) => json!({"namespace": namespace}),
                (None, None, Some(prefix), None) => json!({"prefix": prefix}),
                (None, None, None, Some(ids)) => json!({"entity_ids": ids}),
                _ => {
                    return Err(Failure::Usage(
                        "give exactly one of a filter JSON, --namespace, --prefix, --ids".into(),
                    ));
                }
            };
            batch_delete(&Client::new(&server)?, &body.to_string())
        }
        Command::History {
            entity_id,
            since,
            limit,
            server,
        } => {
            if entity_id.is_empty() {
                return Err(Failure::Usage("entity_id must not be empty".into()));
            }
            let limit = limit.map(|n| n.to_string());
            let query = query_string(&[
                ("entity", Some(&entity_id)),
                ("since", since.as_deref()),
                ("limit", limit.as_deref()),
            ]);
            let path = format!("/api/events{query}");
            Client::new(&server)?.print("GET", &path, Auth::None, None)
        }
        Command::Watch {
            pattern,
            count,
            server,
        } => {
            if pattern.is_empty() {
                return Err(Failure::Usage(
                    "pattern must not be empty: give an entity id, a prefix followed by *, or *"
                        .into(),
                ));
            }
            watch(&server, &pattern, count)
        }
        Command::Namespaces(NamespacesCommand::Register { name, server }) => {
            let body = json!({"name": name});
            let client = Client::new(&server)?;
            client.print(
                "POST",
                "/api/namespaces",
                Auth::Admin,
                Some(&body.to_string()),
            )
        }
        Command::Namespaces(NamespacesCommand::Get { name, server }) => {
            let path = format!("/api/namespaces/{}", encode(&name));
            Client::new(&server)?.print("GET", &path, Auth::None, None)
        }
        Command::Namespaces(NamespacesCommand::Delete { name, server }) => {
            let path = format!("/api/namespaces/{}", encode(&name));
            Client::new(&server)?.print("DELETE", &path, Auth::Admin, None)
        }
        Command::AdminConfig { json, server } => {
            let client = Client::new(&server)?;
            match json {
                None => client.print("GET", "/api/admin/config", Auth::Admin, None),
                Some(text) => {
                    let changes = parse_json("the config", &text)?;
                    client.print(
                        "PUT",
                        "/api/admin/config",
                        Auth::Admin,
                        Some(&changes.to_string()),
                    )
                }
            }
        }
        Command::Connectors { name, server } => {
            let path = match name {
                Some(name) => format!("/api/connectors/{}", encode(&name)),
                None => "/api/connectors".to_string(),
            };
            Client::new(&server)?.print("GET", &path, Auth::None, None)
        }
        Command::Health { server } => {
            Client::new(&server)?.print("GET", "/api/health", Auth::None, None)
        }
    }
}

/// `POST /api/state/entities/delete` with `body`, repeated while the reply says more entities
/// match (`remaining`) and the last call deleted some. One call's reply is printed as it came;
/// several calls print their summed `deleted` and `failed`, their `errors` in order, and the
/// last `remaining` if entities still match.
fn batch_delete(client: &Client<'_>, body: &str) -> Result<(), Failure> {
    let path = "/api/state/entities/delete";
    let first = client.send("POST", path, Auth::Token, Some(body))?;
    let mut reply = match serde_json::from_str::<DeleteReply>(&first) {
        Ok(reply) if reply.more_to_do() => reply,
        _ => return print_reply(&first),
    };
    let mut total = DeleteReply::default();
    loop {
        total.deleted += reply.deleted;
        total.failed += reply.failed;
        total.errors.append(&mut reply.errors);
        total.remaining = reply.remaining.filter(|&left| left > 0);
        if !reply.more_to_do() {
            break;
        }
        let text = client.send("POST", path, Auth::Token, Some(body))?;
        reply = serde_json::from_str(&text).map_err(|e| {
            Failure::Connection(format!(
                "the server's reply is not as expected ({e}): {text}"
            ))
        })?;
    }
    let text = serde_json::to_string(&total)
        .map_err(|e| Failure::Connection(format!("encoding the totals: {e}")))?;
    print_reply(&text)
}

/// A batch delete's reply, or the sum of several.
#[derive(Default, serde::Deserialize, serde::Serialize)]
struct DeleteReply {
    deleted: u64,
    failed: u64,
    #[serde(default)]
    errors: Vec<Value>,
    /// Entities that still match (the server deletes at most 10,000 a call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remaining: Option<u64>,
}

impl DeleteReply {
    /// More entities match, and this call got somewhere: calling again will too.
    fn more_to_do(&self) -> bool {
        self.remaining.is_some_and(|left| left > 0) && self.deleted > 0
    }
}

/// Which token a request carries.
#[derive(Clone, Copy)]
enum Auth {
    /// Reads are public.
    None,
    /// Writes carry `--token` / `FLUX_TOKEN` when set.
    Token,
    /// Admin operations carry `--admin-token` / `FLUX_ADMIN_TOKEN` when set, else `--token`
    /// (which may hold the admin token; a namespace's token reads the config).
    Admin,
}

/// A blocking HTTP client bound to one server.
struct Client<'a> {
    server: &'a ServerArgs,
    /// The URL without a trailing `/`, so paths can be appended.
    base: &'a str,
    agent: ureq::Agent,
}

impl<'a> Client<'a> {
    fn new(server: &'a ServerArgs) -> Result<Client<'a>, Failure> {
        let base = server.base_url()?;
        // Redirects are not followed: ureq would turn a redirected POST or DELETE into a GET
        // (or return a 307's reply as if it were the answer). A 3xx is reported instead.
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(IO_TIMEOUT)
            .timeout_write(IO_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirects(0);
        if base.starts_with("https://") {
            agent = agent.tls_config(server.tls_config()?);
        }
        let agent = agent.build();
        Ok(Client {
            server,
            base,
            agent,
        })
    }

    /// Sends one request and prints the reply body to stdout.
    fn print(
        &self,
        method: &str,
        path: &str,
        auth: Auth,
        body: Option<&str>,
    ) -> Result<(), Failure> {
        print_reply(&self.send(method, path, auth, body)?)
    }

    /// Sends one request; the reply body on 2xx.
    fn send(
        &self,
        method: &str,
        path: &str,
        auth: Auth,
        body: Option<&str>,
    ) -> Result<String, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.request(method, &url);
        fn given(token: &Option<String>) -> Option<&str> {
            token.as_deref().filter(|t| !t.is_empty())
        }
        let token = match auth {
            Auth::None => None,
            Auth::Token => given(&self.server.token).map(|t| (t, "--token (FLUX_TOKEN)")),
            // The admin token may come as `--token` too (its help says so).
            Auth::Admin => given(&self.server.admin_token)
                .map(|t| (t, "--admin-token (FLUX_ADMIN_TOKEN)"))
                .or_else(|| given(&self.server.token).map(|t| (t, "--token (FLUX_TOKEN)"))),
        };
        if let Some((token, source)) = token {
            request = request.set(
                "Authorization",
                &format!("Bearer {}", header_safe(token, source)?),
            );
        }
        let result = match body {
            Some(body) => request
                .set("Content-Type", "application/json")
                .send_string(body),
            None => request.call(),
        };
        match result {
            Ok(response) if (300..400).contains(&response.status()) => {
                let status = response.status();
                let location = response.header("Location").unwrap_or("elsewhere");
                let error = format!(
                    "the server redirected the request (HTTP {status}) to {location}; nothing \
                     was done: give that URL as --url (FLUX_URL)"
                );
                Err(Failure::Http {
                    status,
                    body: json!({ "error": error }).to_string(),
                    retry_after: None,
                })
            }
            Ok(response) => {
                let status = response.status();
                json_reply(status, read_body(response, &url)?)
            }
            Err(ureq::Error::Status(status, response)) => {
                let retry_after = response.header("Retry-After").map(str::to_string);
                let body = read_body(response, &url)?;
                Err(Failure::Http {
                    status,
                    body,
                    retry_after,
                })
            }
            Err(ureq::Error::Transport(transport)) => Err(match transport.kind() {
                ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                    Failure::Usage(format!("--url {:?}: {transport}", self.server.url()))
                }
                _ => unreachable(self.base, &transport),
            }),
        }
    }
}

/// A token trimmed of surrounding whitespace (a token file's line break), refused as a usage
/// error when an HTTP header cannot carry it; the message names where it came from, never
/// the token.
fn header_safe<'t>(token: &'t str, source: &str) -> Result<&'t str, Failure> {
    let token = token.trim();
    if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token)
    } else {
        Err(Failure::Usage(format!(
            "{source} holds a character an HTTP header cannot carry (a line break, a space or a \
             non-ASCII character inside the token)"
        )))
    }
}

/// Writes a reply to stdout, ending it with a line break (a closed stdout is no failure).
fn print_reply(reply: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    let written = if reply.ends_with('\n') || reply.is_empty() {
        stdout.write_all(reply.as_bytes())
    } else {
        writeln!(stdout, "{reply}")
    };
    match written.and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != ErrorKind::BrokenPipe => Err(Failure::Connection(format!(
            "writing the reply to stdout: {error}"
        ))),
        _ => Ok(()),
    }
}

/// The whole reply body (bytes that are not UTF-8 shown as U+FFFD: an error page's body is
/// still the server's answer).
fn read_body(response: ureq::Response, url: &str) -> Result<String, Failure> {
    let mut body = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut body)
        .map_err(|error| {
            Failure::Connection(format!("reading the reply of {url}: {}", cause(&error)))
        })?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A 2xx reply is Flux's JSON (or empty, as a 204's): anything else, such as a proxy's HTML
/// page, is no success.
fn json_reply(status: u16, body: String) -> Result<String, Failure> {
    if body.trim().is_empty() || serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok() {
        return Ok(body);
    }
    let excerpt: String = body.chars().take(200).collect();
    Err(Failure::Http {
        status,
        body: json!({
            "error": format!("the reply (HTTP {status}) is not JSON, so not Flux's: {excerpt}")
        })
        .to_string(),
        retry_after: None,
    })
}

/// The server at `url` could not be reached, for the innermost cause of `error`; a
/// certificate that is not trusted says so, and how to trust it.
fn unreachable(url: &str, error: &(dyn std::error::Error + 'static)) -> Failure {
    if let Some(explained) =
        certificate_error(error).and_then(|tls| flux_tls::explain_refusal(tls, url_host(url)))
    {
        return Failure::Connection(format!("cannot reach {url}: {explained}"));
    }
    Failure::Connection(format!("cannot reach {url}: {}", cause(error)))
}

/// The host of `url` (`scheme://[user@]host[:port][/path]`), brackets of an IPv6 address kept.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match host_port.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => host,
        _ => host_port,
    }
}

/// The certificate check that refused the server, found anywhere in `error`'s chain: rustls
/// reports it as the payload of an I/O error, which ureq and tungstenite wrap again.
fn certificate_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls @ rustls::Error::InvalidCertificate(_)) = tls {
            return Some(tls);
        }
        next = error.source();
    }
    None
}

/// What went wrong, said once: ureq and tungstenite wrap the I/O error, each layer adding its
/// own "Network Error: " or "IO error: " to the text, so only the innermost error is told,
/// the common socket failures in plain words.
fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    match innermost
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
    {
        Some(ErrorKind::ConnectionRefused) => "connection refused".to_string(),
        Some(ErrorKind::ConnectionReset) => "connection reset by the server".to_string(),
        // A socket read timeout shows as WouldBlock on Unix.
        Some(ErrorKind::TimedOut | ErrorKind::WouldBlock) => "timed out".to_string(),
        _ => innermost.to_string(),
    }
}

/// Subscribes to `pattern` and prints update messages, one a line, until `count` of them
/// (or forever).
fn watch(server: &ServerArgs, pattern: &str, count: Option<u64>) -> Result<(), Failure> {
    let base = server.base_url()?;
    let (websocket_url, tls) = match base.strip_prefix("http://") {
        Some(rest) => (format!("ws://{rest}/api/ws"), None),
        None => {
            let rest = base.trim_start_matches("https://");
            (format!("wss://{rest}/api/ws"), Some(server.tls_config()?))
        }
    };
    let mut socket = open_websocket(base, &websocket_url, tls)?;
    let subscribe = json!({"type": "subscribe", "entity_id": pattern}).to_string();
    socket
        .send(Message::text(subscribe))
        .map_err(|error| unreachable(base, &error))?;
    // Subscribed: from here on waiting for updates is the job, however long the server is
    // quiet, so the handshake's timeouts end. Reads wake every STDOUT_CHECK to see whether
    // stdout's reader went away (`flux watch … | head -1`), which a quiet server would
    // otherwise leave unnoticed until the next message.
    let stream = socket.get_ref().tcp();
    stream
        .set_read_timeout(Some(STDOUT_CHECK))
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|error| unreachable(base, &error))?;
    // Credentials a URL may carry (`user:password@`) are not echoed to a terminal or log.
    let shown = match websocket_url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, path)) if authority.contains('@') => {
                let host = authority
                    .rsplit_once('@')
                    .map_or(authority, |(_, host)| host);
                format!("{scheme}://…@{host}/{path}")
            }
            _ => websocket_url.clone(),
        },
        None => websocket_url.clone(),
    };
    let _ = writeln!(std::io::stderr(), "flux: watching {pattern:?} on {shown}");

    let mut seen = 0;
    let mut stdout = std::io::stdout().lock();
    while count.is_none_or(|limit| seen < limit) {
        let message = match socket.read() {
            Ok(message) => message,
            // The read timed out (STDOUT_CHECK): tungstenite keeps what it had read so far,
            // and rustls what it had of a TLS record.
            Err(tungstenite::Error::Io(error))
                if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                if stdout_reader_gone() {
                    return Ok(());
                }
                continue;
            }
            Err(error) => {
                return Err(Failure::Connection(format!(
                    "connection to {base} lost: {}",
                    cause(&error)
                )));
            }
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let why = frame.map_or(String::new(), |f| format!(" ({} {})", f.code, f.reason));
                return Err(Failure::Connection(format!(
                    "the server closed the connection{why}"
                )));
            }
            _ => continue,
        };
        // Only the type is read; the message is printed as the server sent it, so values keep
        // their exact text (numbers beyond a double, `1.10`, `1e400`).
        let kind = match serde_json::from_str::<MessageKind<'_>>(text.as_str()) {
            Ok(kind) => kind.kind,
            Err(error) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "flux: a message that is not JSON ({error}): {}",
                    text.as_str()
                );
                continue;
            }
        };
        match kind.as_deref() {
            Some("state_update" | "entity_deleted") => {
                seen += 1;
                // One message a line: a JSON text holds raw line breaks only between tokens
                // (inside strings they are escaped), so they can become spaces.
                let line = text.as_str().trim().replace(['\n', '\r'], " ");
                if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
                    if error.kind() == ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(Failure::Connection(format!("writing to stdout: {error}")));
                }
            }
            // The subscribe is the only message this client sends, and the server sends an
            // error only in answer to a client's message (SPEC.md "WebSocket"), so this is the
            // subscription refused: no update will ever come.
            Some("error") => return Err(Failure::Refused(text.as_str().trim().to_string())),
            _ => {}
        }
    }
    let _ = socket.close(None);
    let _ = socket.flush();
    Ok(())
}

/// How often a quiet `watch` checks that stdout still has a reader.
const STDOUT_CHECK: Duration = Duration::from_millis(500);

/// Whether stdout is a pipe whose reader has gone (writing would fail with a broken pipe).
fn stdout_reader_gone() -> bool {
    let mut poll = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout; poll only reports on the descriptor.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & libc::POLLERR != 0
}

/// The `type` of a server message, read without parsing (or altering) anything else.
#[derive(serde::Deserialize)]
struct MessageKind<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// `watch`'s connection: a plain socket (`ws://`), or a TLS session on one (`wss://`).
enum WsStream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl WsStream {
    /// The TCP socket underneath, whose timeouts bound every read and write.
    fn tcp(&self) -> &TcpStream {
        match self {
            WsStream::Plain(stream) => stream,
            WsStream::Tls(stream) => stream.get_ref(),
        }
    }
}

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            WsStream::Plain(stream) => stream.read(buf),
            WsStream::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            WsStream::Plain(stream) => stream.write(buf),
            WsStream::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            WsStream::Plain(stream) => stream.flush(),
            WsStream::Tls(stream) => stream.flush(),
        }
    }
}

/// The WebSocket of the server at `base`, for `websocket_url`; over TLS with `tls` (a
/// `wss://` URL), the certificate checked for the URL's host. Reaching the server and the
/// TLS and WebSocket handshakes are bounded ([`CONNECT_TIMEOUT`], then [`HANDSHAKE_TIMEOUT`]
/// for each read or write): a server that accepts connections but never answers is reported
/// as unreachable instead of waited for forever. The timeouts stay set; the caller ends them.
fn open_websocket(
    base: &str,
    websocket_url: &str,
    tls: Option<Arc<ClientConfig>>,
) -> Result<WebSocket<WsStream>, Failure> {
    let request = websocket_url
        .into_client_request()
        .map_err(|reason| Failure::Usage(format!("{websocket_url}: {reason}")))?;
    let Some(host) = request.uri().host() else {
        return Err(Failure::Usage(format!("{websocket_url}: no host name")));
    };
    // An IPv6 address comes in brackets (`[::1]`); the resolver wants it bare.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let default_port = if tls.is_some() { 443 } else { 80 };
    // `Uri::port` is `None` for a port that does not fit in 16 bits, as for none at all:
    // read what follows the host instead, so that such a port is refused, not replaced.
    let authority = request.uri().authority().map_or("", |a| a.as_str());
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, rest)| rest);
    let after_host = host_port
        .rsplit_once(']')
        .map_or(host_port, |(_, rest)| rest);
    let port = match after_host.rsplit_once(':') {
        None => default_port,
        Some((_, port)) => port
            .parse()
            .map_err(|_| Failure::Usage(format!("{websocket_url}: invalid port {port:?}")))?,
    };
    let mut tcp = connect(host, port).map_err(|error| unreachable(base, &error))?;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|error| unreachable(base, &error))?;
    let stream = match tls {
        None => WsStream::Plain(tcp),
        Some(config) => {
            let name = flux_tls::server_name(host)
                .map_err(|error| Failure::Usage(format!("{websocket_url}: {error:#}")))?;
            let mut session = ClientConnection::new(config, name).map_err(|error| {
                Failure::Connection(format!("cannot reach {base}: TLS: {error}"))
            })?;
            // The TLS handshake first, so that its failures (a certificate not trusted) are
            // told as such rather than as a failed WebSocket handshake.
            while session.is_handshaking() {
                session
                    .complete_io(&mut tcp)
                    .map_err(|error| tls_handshake_failure(base, &error))?;
            }
            WsStream::Tls(Box::new(StreamOwned::new(session, tcp)))
        }
    };
    match tungstenite::client(request, stream) {
        Ok((socket, _)) => Ok(socket),
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => Err(Failure::Http {
            status: response.status().as_u16(),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
            retry_after: None,
        }),
        Err(HandshakeError::Failure(error)) => Err(unreachable(base, &error)),
        // A blocking socket is interrupted only by its read or write timeout.
        Err(HandshakeError::Interrupted(_)) => Err(Failure::Connection(format!(
            "cannot reach {base}: no answer to the WebSocket handshake within {HANDSHAKE_TIMEOUT:?}"
        ))),
    }
}

/// The TLS handshake with the server at `base` failed with `error`; a read or write timeout
/// (WouldBlock on Unix) is a server that does not answer.
fn tls_handshake_failure(base: &str, error: &std::io::Error) -> Failure {
    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        return Failure::Connection(format!(
            "cannot reach {base}: no answer to the TLS handshake within {HANDSHAKE_TIMEOUT:?}"
        ));
    }
    unreachable(base, error)
}

/// A TCP connection to the first address of `host` that answers within [`CONNECT_TIMEOUT`];
/// the last address's error when none does.
fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last_error = std::io::Error::new(ErrorKind::NotFound, "the name has no address");
    for address in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// An event as the CLI sends it; properties stay raw JSON.
#[derive(serde::Serialize)]
struct OutgoingEvent<'a> {
    stream: &'a str,
    source: &'a str,
    timestamp: u64,
    payload: OutgoingPayload<'a>,
    #[serde(rename = "eventId", skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct OutgoingPayload<'a> {
    entity_id: &'a str,
    properties: &'a RawValue,
}

/// The batch `text` with `timestamp` (now) filled into every event that lacks one, as
/// `flux.sh` does. Values stay raw JSON, so numbers travel exactly as typed.
fn fill_timestamps(text: &str) -> Result<String, Failure> {
    #[derive(serde::Deserialize)]
    struct Wrapped {
        events: Vec<Box<RawValue>>,
    }
    let trimmed = text.trim_start();
    let (events, wrapped) = if trimmed.starts_with('[') {
        let events: Vec<Box<RawValue>> = serde_json::from_str(text)
            .map_err(|e| Failure::Usage(format!("the batch is not JSON: {e}")))?;
        (events, false)
    } else if trimmed.starts_with('{') {
        let wrapped: Wrapped = serde_json::from_str(text).map_err(|_| batch_shape())?;
        (wrapped.events, true)
    } else {
        return Err(batch_shape());
    };
    let now = RawValue::from_string(now_ms().to_string())
        .map_err(|e| Failure::Usage(format!("timestamp: {e}")))?;
    let mut filled = Vec::with_capacity(events.len());
    for event in events {
        let object: Option<std::collections::BTreeMap<String, Box<RawValue>>> =
            serde_json::from_str(event.get()).ok();
        match object {
            Some(mut fields)
                if fields
                    .get("timestamp")
                    .is_none_or(|t| t.get().trim() == "null") =>
            {
                fields.insert("timestamp".to_string(), now.clone());
                let text = serde_json::to_string(&fields)
                    .map_err(|e| Failure::Usage(format!("encoding an event: {e}")))?;
                filled.push(
                    RawValue::from_string(text)
                        .map_err(|e| Failure::Usage(format!("encoding an event: {e}")))?,
                );
            }
            // Not an object, or already timed: sent as given (the server judges it).
            _ => filled.push(event),
        }
    }
    let encoded = serde_json::to_string(&filled)
        .map_err(|e| Failure::Usage(format!("encoding the batch: {e}")))?;
    Ok(if wrapped {
        format!("{{\"events\":{encoded}}}")
    } else {
        encoded
    })
}

fn batch_shape() -> Failure {
    Failure::Usage("the batch must be a JSON array of events or {\"events\": [...]}".into())
}

fn parse_json(what: &str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text)
        .map_err(|error| Failure::Usage(format!("{what} is not JSON: {error}")))
}

fn read_stdin() -> Result<String, Failure> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|error| Failure::Usage(format!("reading stdin: {error}")))?;
    Ok(text)
}

/// The path of one entity; an empty id would name the list instead, so it is refused.
fn entity_path(entity_id: &str) -> Result<String, Failure> {
    if entity_id.is_empty() {
        return Err(Failure::Usage("entity_id must not be empty".into()));
    }
    Ok(format!("/api/state/entities/{}", encode(entity_id)))
}

fn encode(component: &str) -> String {
    utf8_percent_encode(component, COMPONENT).to_string()
}

/// `?a=1&b=2` from the pairs that have a value; empty when none has.
fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if let Some(value) = value {
            out.push(if out.is_empty() { '?' } else { '&' });
            out.push_str(name);
            out.push('=');
            out.push_str(&encode(value));
        }
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::url_host;

    #[test]
    fn url_host_is_the_host_alone() {
        for (url, host) in [
            ("https://example.com", "example.com"),
            ("https://127.0.0.1:8443", "127.0.0.1"),
            ("https://user:pw@localhost:1/prefix", "localhost"),
            ("https://[::1]:443", "[::1]"),
            ("https://[::1]", "[::1]"),
        ] {
            assert_eq!(url_host(url), host, "{url}");
        }
    }
}
