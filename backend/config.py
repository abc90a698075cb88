"""Settings from the environment, with safe development defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def _env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0").lower() in {"1", "true", "yes", "on"}


DEV_SECRET = "dev-only-secret-change-me-in-production-0123456789abcdef"


@dataclass(frozen=True, slots=True)
class Settings:
    """Every tunable number and address of the backend, read once at start-up."""

    environment: str = field(default_factory=lambda: _env("CC_ENV", "development"))
    """`development`, `test` or `production`; production refuses the development secret."""
    debug: bool = field(default_factory=lambda: _env_bool("CC_DEBUG", False))
    """Litestar debug mode (tracebacks in responses); never in production."""
    database_url: str = field(
        default_factory=lambda: _env("DATABASE_URL", "postgresql+asyncpg://cc_app:cc_app@127.0.0.1:55432/contactcenter")
    )
    """The application role's DSN: owns nothing, cannot bypass row-level security."""
    database_owner_url: str = field(
        default_factory=lambda: _env(
            "DATABASE_OWNER_URL", "postgresql+asyncpg://cc_owner:cc_owner@127.0.0.1:55432/contactcenter"
        )
    )
    """The schema owner's DSN, used only by migrations."""
    database_pool_size: int = field(default_factory=lambda: _env_int("CC_DB_POOL_SIZE", 20))
    """Connections kept per process."""
    database_max_overflow: int = field(default_factory=lambda: _env_int("CC_DB_MAX_OVERFLOW", 10))
    """Extra connections a process may open under load."""
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", "redis://127.0.0.1:56379/0"))
    """Redis for routing state, caches, throttling, pub/sub and the job queue."""
    redis_max_connections: int = field(default_factory=lambda: _env_int("CC_REDIS_MAX_CONNECTIONS", 2000))
    """Connections a process's Redis pool may open. redis-py's own default (100) refuses the 101st command in
    flight ("Too many connections"): call control with hundreds of live calls, each waiting on blocking
    reads, went past it and dropped calls. Redis itself takes 10,000 clients by default."""
    public_base_url: str = field(default_factory=lambda: _env("CC_PUBLIC_BASE_URL", "http://127.0.0.1:8000"))
    """Where users reach the API; used in e-mailed links and SSO redirects."""
    secret_key: str = field(default_factory=lambda: _env("CC_SECRET_KEY", DEV_SECRET))
    """Signs access tokens and encrypts TOTP secrets. At least 32 characters."""
    provider_sip_domain: str = field(default_factory=lambda: _env("CC_SIP_DOMAIN", "sip.cc.test"))
    """Tenants' SIP domains are `<slug>.<this>`."""
    access_token_ttl_seconds: int = field(default_factory=lambda: _env_int("CC_ACCESS_TOKEN_TTL", 600))
    """Lifetime of a JWT access token (at most 15 minutes)."""
    session_idle_timeout_seconds: int = field(default_factory=lambda: _env_int("CC_SESSION_IDLE", 1800))
    """A session whose refresh token is not used for this long ends."""
    session_absolute_timeout_seconds: int = field(default_factory=lambda: _env_int("CC_SESSION_ABSOLUTE", 12 * 3600))
    """A session ends this long after login, however active."""
    email_token_ttl_seconds: int = field(default_factory=lambda: _env_int("CC_EMAIL_TOKEN_TTL", 24 * 3600))
    """Lifetime of e-mail verification and invitation links."""
    password_reset_ttl_seconds: int = field(default_factory=lambda: _env_int("CC_PASSWORD_RESET_TTL", 1800))
    """Lifetime of a password-reset link."""
    login_failures_per_account: int = field(default_factory=lambda: _env_int("CC_LOGIN_FAIL_ACCOUNT", 10))
    """Failed logins allowed per account per window before 429."""
    login_account_window_seconds: int = field(default_factory=lambda: _env_int("CC_LOGIN_FAIL_ACCOUNT_WINDOW", 900))
    """The per-account failure window."""
    login_failures_per_address: int = field(default_factory=lambda: _env_int("CC_LOGIN_FAIL_ADDRESS", 30))
    """Failed logins allowed per client address per window before 429."""
    login_address_window_seconds: int = field(default_factory=lambda: _env_int("CC_LOGIN_FAIL_ADDRESS_WINDOW", 60))
    """The per-address failure window."""
    password_min_length: int = field(default_factory=lambda: _env_int("CC_PASSWORD_MIN_LENGTH", 12))
    """Shortest accepted password (ASVS 5.0 V6.2.1 asks for 8 at least; we ask more)."""
    password_max_length: int = field(default_factory=lambda: _env_int("CC_PASSWORD_MAX_LENGTH", 128))
    """Longest accepted password (ASVS asks that 64 at least be allowed)."""
    request_max_body_bytes: int = field(default_factory=lambda: _env_int("CC_MAX_BODY", 1_048_576))
    """Default request body limit; streamed upload routes name larger limits of their own."""
    max_inflight_requests: int = field(default_factory=lambda: _env_int("CC_MAX_INFLIGHT", 512))
    """Requests one process serves at once; beyond it the API answers 429 with Retry-After."""
    revocation_recheck_seconds: int = field(default_factory=lambda: _env_int("CC_REVOCATION_RECHECK", 30))
    """How often an open WebSocket re-checks its credentials, in case a revocation message was missed."""
    agent_disconnect_grace_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_AGENT_DISCONNECT_GRACE", "30"))
    )
    """An available agent whose last workspace connection has been gone this long becomes away."""
    sso_http_timeout_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_SSO_HTTP_TIMEOUT", "5")))
    """Timeout of each request to a tenant's identity provider."""
    sso_metadata_cache_seconds: int = field(default_factory=lambda: _env_int("CC_SSO_METADATA_CACHE", 300))
    """How long an IdP's discovery document and keys are cached."""
    sso_state_ttl_seconds: int = field(default_factory=lambda: _env_int("CC_SSO_STATE_TTL", 600))
    """How long a started single sign-on may take to come back."""
    ws_ticket_ttl_seconds: int = field(default_factory=lambda: _env_int("CC_WS_TICKET_TTL", 30))
    """Lifetime of a single-use WebSocket ticket."""
    api_key_touch_interval_seconds: int = field(default_factory=lambda: _env_int("CC_API_KEY_TOUCH", 60))
    """An API key's last use is written at most this often."""
    switch_shared_secret: str = field(default_factory=lambda: _env("CC_SWITCH_SECRET", "dev-switch-secret"))
    """Secret FreeSWITCH nodes present on xml_curl and CDR requests."""
    esl_connect_timeout_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_ESL_CONNECT_TIMEOUT", "5"))
    )
    """Seconds to open a switch's event socket and be greeted."""
    esl_command_timeout_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_ESL_COMMAND_TIMEOUT", "10"))
    )
    """Seconds to wait for an ESL command's reply before the connection is dropped and re-made."""
    esl_api_timeout_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_API_TIMEOUT", "30")))
    """Seconds to wait for an `api` answer (slow commands go through bgapi)."""
    esl_job_timeout_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_JOB_TIMEOUT", "120")))
    """Seconds to wait for a bgapi job's BACKGROUND_JOB (an originate rings for up to a minute)."""
    esl_reconnect_initial_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_ESL_RECONNECT_INITIAL", "0.5"))
    )
    """First delay before reconnecting to a switch; it doubles after each failure."""
    esl_reconnect_max_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_ESL_RECONNECT_MAX", "10"))
    )
    """Longest delay between reconnection attempts."""
    esl_reconnect_jitter: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_RECONNECT_JITTER", "0.2")))
    """Random spread of reconnection delays (0.2 = +/-20%) so processes do not retry in step."""
    esl_event_queue_size: int = field(default_factory=lambda: _env_int("CC_ESL_EVENT_QUEUE", 10_000))
    """Events buffered between the ESL reader and our handlers; beyond it events are dropped, counted and logged."""
    esl_links_enabled: bool = field(default_factory=lambda: _env_bool("CC_ESL_LINKS", True))
    """Whether this worker process competes for switch nodes' inbound event sockets (any number of workers may)."""
    esl_node_pattern: str = field(default_factory=lambda: _env("CC_ESL_NODES", ""))
    """Which nodes this process may hold, as shell patterns of node names (`fs-paris-*,fs-lyon-*`); empty: all."""
    esl_lease_ttl_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_LEASE_TTL", "3")))
    """A process's hold on a node's inbound event socket lasts this long unless renewed (a dead holder's node is
    taken over within about this long plus one poll; keep it well under the heartbeat timeout)."""
    esl_lease_renew_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_LEASE_RENEW", "1")))
    """How often the holder renews its lease; at most a third of the lease time."""
    esl_lease_poll_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_LEASE_POLL", "0.5")))
    """How often a process looks for nodes nobody holds."""
    esl_rebalance_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_REBALANCE", "30")))
    """A process holding more than its share of the nodes gives one up (to a process with fewer) at most this
    often; 0 never does. The node's new holder re-reads its state on connecting."""
    esl_resync_min_seconds: float = field(default_factory=lambda: float(os.environ.get("CC_ESL_RESYNC_MIN", "5")))
    """After events were dropped (the consumer fell behind), a node's state is re-read at most this often."""
    switch_nodes_refresh_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_NODES_REFRESH", "5"))
    )
    """How often the holders re-read the registered nodes (added, changed, removed) without a restart."""
    switch_event_lanes: int = field(default_factory=lambda: _env_int("CC_SWITCH_EVENT_LANES", 16))
    """A node's events are applied by this many lanes at once; one leg's events (and one seat's registrations)
    always take the same lane, so they are applied in the order the node sent them."""
    switch_event_retries: int = field(default_factory=lambda: _env_int("CC_SWITCH_EVENT_RETRIES", 5))
    """Attempts after the first at applying a switch event when the database or Redis fails transiently."""
    switch_event_retry_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_EVENT_RETRY", "0.2"))
    )
    """First delay before retrying a switch event; it doubles after each failed attempt."""
    switch_event_lag_warning_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_EVENT_LAG_WARNING", "1"))
    )
    """An event applied this long after the switch fired it is logged (the holder is falling behind)."""
    switch_command_timeout_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_COMMAND_TIMEOUT", "10"))
    )
    """How long a process waits for the node's holder to answer a command (`api`, or a bgapi's acceptance)."""
    switch_command_concurrency: int = field(default_factory=lambda: _env_int("CC_SWITCH_COMMAND_CONCURRENCY", 64))
    """Commands from other processes that one holder runs at once per node."""
    switch_source_cache_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_SOURCE_CACHE", "5"))
    )
    """How long a process trusts its copy of the registered switch nodes' source addresses."""
    call_control_address: str = field(default_factory=lambda: _env("CC_CALL_CONTROL_ADDRESS", "127.0.0.1:8084"))
    """`host:port` of the outbound-ESL call-control server that the dialplan's `socket` application connects to."""
    call_control_listen: str = field(default_factory=lambda: _env("CC_CALL_CONTROL_LISTEN", ""))
    """`host:port` the call-control server binds (empty: `CC_CALL_CONTROL_ADDRESS`); several processes may share it."""
    call_control_lease_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_LEASE", "15"))
    )
    """A call whose controlling process has not renewed its claim this long is taken over by another process."""
    call_control_renew_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_RENEW", "4"))
    )
    """How often a call-control process renews the claims on its calls."""
    call_control_sweep_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_SWEEP", "3"))
    )
    """How often a call-control process looks for calls whose controller died (and adopts them)."""
    call_control_music_seconds: int = field(default_factory=lambda: _env_int("CC_CALL_CONTROL_MUSIC_SECONDS", 20))
    """A stretch of music on hold lasts at most this long (`playback_timeout_sec`), then the next one starts (a
    `local_stream://` joins the stream where it is: nothing audible). `local_stream://` never ends by itself, and
    a caller whose controlling process died only reaches the dialplan's second `socket` once it does."""
    call_control_offer_poll_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_OFFER_POLL", "2"))
    )
    """How often a waiting call asks routing for an offer it may have missed (signals make it immediate)."""
    call_control_request_timeout_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_REQUEST_TIMEOUT", "8"))
    )
    """How long an API request (hold, transfer, recording) waits for the process controlling the call."""
    call_control_adopted_poll_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_ADOPTED_POLL", "2"))
    )
    """How often a call taken over without its socket is checked on its node (is it still up?)."""
    call_control_announcement_scale: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_ANNOUNCEMENT_SCALE", "1"))
    )
    """Multiplies queues' announcement intervals (1 in production; tests shorten them)."""
    call_control_transfer_ring_seconds: int = field(
        default_factory=lambda: _env_int("CC_CALL_CONTROL_TRANSFER_RING", 30)
    )
    """How long an agent's phone rings for a call put straight through to them (an IVR or blind transfer)."""
    supervision_ring_seconds: int = field(default_factory=lambda: _env_int("CC_SUPERVISION_RING", 20))
    """How long a supervisor's softphone rings when they start listening to a call (`originate_timeout`)."""
    call_control_callback_digit: str = field(default_factory=lambda: _env("CC_CALL_CONTROL_CALLBACK_DIGIT", "1"))
    """The key a waiting caller presses to be called back instead (empty: no callback offer while waiting)."""
    call_control_default_music: str = field(
        default_factory=lambda: _env("CC_CALL_CONTROL_DEFAULT_MUSIC", "local_stream://moh")
    )
    """What a waiting caller hears when the queue has no music of its own (FreeSWITCH's default stream)."""
    call_control_upload_attempts: int = field(default_factory=lambda: _env_int("CC_CALL_CONTROL_UPLOAD_ATTEMPTS", 3))
    """Times call control asks a node to upload a recording or message that has not arrived after the call."""
    call_control_upload_wait_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_CALL_CONTROL_UPLOAD_WAIT", "5"))
    )
    """How long after a call call control waits for the node's own upload before asking for it again."""
    switch_recordings_dir: str = field(
        default_factory=lambda: _env("CC_SWITCH_RECORDINGS_DIR", "${recordings_dir}/contactcenter")
    )
    """Where nodes write recordings and messages before uploading them (FreeSWITCH expands `${...}`)."""
    switch_http_cache_profile: str = field(
        default_factory=lambda: _env("CC_SWITCH_HTTP_CACHE_PROFILE", "contactcenter")
    )
    """The mod_http_cache profile whose headers (the switch secret) authenticate uploads from the node."""
    switch_sip_profile: str = field(default_factory=lambda: _env("CC_SWITCH_SIP_PROFILE", "internal"))
    """The sofia profile agents' phones register on (used to call a phone registered on another node)."""
    switch_heartbeat_timeout_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_HEARTBEAT_TIMEOUT", "6"))
    )
    """A switch node silent this long is marked down (the product's FreeSWITCH sends HEARTBEAT every 2 s)."""
    switch_watchdog_interval_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_WATCHDOG_INTERVAL", "1"))
    )
    """How often the watchdog looks for silent nodes, unhandled failures and expired registrations."""
    switch_failover_claim_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CC_SWITCH_FAILOVER_CLAIM", "30"))
    )
    """A process handling a failed node's calls and agents has this long before another process takes over."""
    sip_registration_grace_seconds: int = field(default_factory=lambda: _env_int("CC_SIP_REGISTRATION_GRACE", 30))
    """A registration not renewed this long after its SIP expiry is dropped even if no expire event came."""
    cdr_err_log_dir: str = field(default_factory=lambda: _env("CC_CDR_ERR_LOG_DIR", ""))
    """Where mod_json_cdr leaves CDRs it could not post (its `err-log-dir`), for `contactcenter import-cdrs`."""
    cdr_import_done_dir: str = field(default_factory=lambda: _env("CC_CDR_IMPORT_DONE_DIR", ""))
    """Where imported CDR files are moved; empty: they are deleted once stored."""
    ivr_max_nodes: int = field(default_factory=lambda: _env_int("CC_IVR_MAX_NODES", 200))
    """Most nodes one IVR flow may have."""
    ivr_max_graph_bytes: int = field(default_factory=lambda: _env_int("CC_IVR_MAX_GRAPH_BYTES", 131_072))
    """Largest IVR flow graph, as compact JSON."""
    ivr_max_visits: int = field(default_factory=lambda: _env_int("CC_IVR_MAX_VISITS", 20))
    """Highest `max_visits` a node may declare (how often one call may pass through it)."""
    ivr_max_retries: int = field(default_factory=lambda: _env_int("CC_IVR_MAX_RETRIES", 10))
    """Highest `max_retries` of a menu, digit collection or callback offer."""
    ivr_max_steps: int = field(default_factory=lambda: _env_int("CC_IVR_MAX_STEPS", 1000))
    """Nodes one call may pass through before the interpreter hangs up (a safety net; validation bounds loops)."""
    tts_engine: str = field(default_factory=lambda: _env("CC_TTS_ENGINE", "flite"))
    """The FreeSWITCH speech module text-to-speech prompts are spoken with (`tts://<engine>|<voice>|<text>`)."""
    tts_default_voice: str = field(default_factory=lambda: _env("CC_TTS_DEFAULT_VOICE", "slt"))
    """The voice of a TTS prompt that names none and follows no `set_language` voice."""
    media_storage: str = field(default_factory=lambda: _env("CC_MEDIA_STORAGE", "local"))
    """Where prompts, recordings and voicemail are kept: `local` (a folder) or `s3` (S3-compatible object storage)."""
    media_local_root: str = field(default_factory=lambda: _env("CC_MEDIA_LOCAL_ROOT", "/var/lib/contactcenter/media"))
    """The folder of the `local` media storage."""
    media_s3_endpoint: str = field(default_factory=lambda: _env("CC_MEDIA_S3_ENDPOINT", ""))
    """The S3 endpoint URL (empty: AWS's own for the region)."""
    media_s3_bucket: str = field(default_factory=lambda: _env("CC_MEDIA_S3_BUCKET", "contactcenter-media"))
    """The bucket of the `s3` media storage."""
    media_s3_region: str = field(default_factory=lambda: _env("CC_MEDIA_S3_REGION", "us-east-1"))
    """The bucket's region (SigV4 signs with it)."""
    media_s3_access_key: str = field(default_factory=lambda: _env("CC_MEDIA_S3_ACCESS_KEY", ""))
    """Access key id of the `s3` media storage."""
    media_s3_secret_key: str = field(default_factory=lambda: _env("CC_MEDIA_S3_SECRET_KEY", ""))
    """Secret access key of the `s3` media storage."""
    media_spool_dir: str = field(default_factory=lambda: _env("CC_MEDIA_SPOOL_DIR", ""))
    """Where uploads are spooled while their format and size are checked (empty: the system's temporary folder)."""
    prompt_max_bytes: int = field(default_factory=lambda: _env_int("CC_PROMPT_MAX_BYTES", 20 * 1_048_576))
    """Largest prompt or music-on-hold file a tenant may upload."""
    recording_max_bytes: int = field(default_factory=lambda: _env_int("CC_RECORDING_MAX_BYTES", 512 * 1_048_576))
    """Largest call recording a switch node may upload (8 kHz 16-bit mono WAV is about 58 MB an hour)."""
    voicemail_max_bytes: int = field(default_factory=lambda: _env_int("CC_VOICEMAIL_MAX_BYTES", 32 * 1_048_576))
    """Largest voicemail message a switch node may upload."""
    voicemail_max_seconds: int = field(default_factory=lambda: _env_int("CC_VOICEMAIL_MAX_SECONDS", 300))
    """Longest voicemail message a flow or queue may ask the switch to record."""
    media_upload_deadline_seconds: int = field(default_factory=lambda: _env_int("CC_MEDIA_UPLOAD_DEADLINE", 3600))
    """A recording or message not uploaded this long after it ended is marked failed (and logged)."""
    switch_media_base_url: str = field(
        default_factory=lambda: _env("CC_SWITCH_MEDIA_BASE_URL", "http://127.0.0.1:8000")
    )
    """How switch nodes reach the API for prompts and uploads (`http_cache://` URLs are built on it)."""
    switch_media_max_age_seconds: int = field(default_factory=lambda: _env_int("CC_SWITCH_MEDIA_MAX_AGE", 30 * 86_400))
    """`Cache-Control: max-age` of prompt files; their URLs carry the content hash, so a change is a new URL."""
    outbound_concurrent_calls_default: int = field(default_factory=lambda: _env_int("CC_OUTBOUND_CONCURRENT_CALLS", 10))
    """Concurrent outbound calls of a tenant whose plan names no cap of its own."""
    outbound_lease_seconds: int = field(default_factory=lambda: _env_int("CC_OUTBOUND_LEASE_SECONDS", 90))
    """An outbound call's slot expires this long after its last renewal, so a crashed process cannot leak it."""
    outbound_agent_ring_seconds: int = field(default_factory=lambda: _env_int("CC_OUTBOUND_AGENT_RING", 30))
    """How long an agent's own phone rings for a call they place (click-to-call, an accepted callback)."""
    outbound_customer_ring_seconds: int = field(default_factory=lambda: _env_int("CC_OUTBOUND_CUSTOMER_RING", 45))
    """How long the customer's phone rings (through the carrier gateway) before the attempt counts as no answer."""
    outbound_dial_wait_seconds: int = field(default_factory=lambda: _env_int("CC_OUTBOUND_DIAL_WAIT", 10))
    """A click-to-call no call-control process has picked up this long after it was asked fails (`not_dialled`)."""
    page_size_default: int = field(default_factory=lambda: _env_int("CC_PAGE_SIZE", 50))
    """Items per page when a list request names no limit."""
    page_size_max: int = field(default_factory=lambda: _env_int("CC_PAGE_SIZE_MAX", 200))
    """Most items a list request may ask for."""
    customer_phones_max: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_PHONES_MAX", 20))
    """Most phone numbers one customer record holds (the same limit applies to e-mails, OpenIDs and external ids)."""
    customer_tags_max: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_TAGS_MAX", 50))
    """Most tags on one customer record."""
    customer_text_field_max: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_TEXT_FIELD_MAX", 2000))
    """Longest value of a custom text field (a field definition may ask for less)."""
    customer_note_max: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_NOTE_MAX", 10_000))
    """Longest note or ticket comment, in characters."""
    screen_pop_interactions: int = field(default_factory=lambda: _env_int("CC_SCREEN_POP_INTERACTIONS", 20))
    """How many of the caller's latest interactions a screen pop shows."""
    screen_pop_max_customers: int = field(default_factory=lambda: _env_int("CC_SCREEN_POP_MAX_CUSTOMERS", 10))
    """Most customers a screen pop returns when several share an address (a family's landline)."""
    customer_recent_contact_seconds: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_RECENT_CONTACT", 3600))
    """How long after an interaction ends its agent still reaches the customer's record, whatever its unit."""
    customer_config_cache_seconds: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_CONFIG_CACHE", 30))
    """How long a process keeps a tenant's phone region and custom-field definitions before reading them again."""
    customer_import_max_bytes: int = field(
        default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_MAX_BYTES", 512 * 1024 * 1024)
    )
    """Largest customer CSV upload; the upload route streams and refuses beyond it (413)."""
    customer_import_max_rows: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_MAX_ROWS", 1_000_000))
    """Most data rows one import reads; the rows beyond are reported, not imported."""
    customer_import_max_cell_chars: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_MAX_CELL", 10_000))
    """Longest cell of an import; a longer one is a row error."""
    customer_import_max_row_chars: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_MAX_ROW", 100_000))
    """Longest physical line of an import; beyond it the line is cut off and its row reported."""
    customer_import_batch_rows: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_BATCH", 1000))
    """Rows an import writes per transaction; progress advances by this much."""
    customer_import_chunk_bytes: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_CHUNK", 1024 * 1024))
    """Size of the pieces an uploaded file is stored in until its import job reads it."""
    customer_import_job_timeout_seconds: int = field(
        default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_TIMEOUT", 4 * 3600)
    )
    """Longest an import job may run before the job queue gives up on it."""
    customer_import_attempts: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_IMPORT_ATTEMPTS", 3))
    """Runs an import job gets (each resumes after the last committed batch) before the import is marked failed."""
    customer_export_batch_rows: int = field(default_factory=lambda: _env_int("CC_CUSTOMER_EXPORT_BATCH", 1000))
    """Customers an export reads from the database at a time."""
    ticket_sla_minutes_urgent: int = field(default_factory=lambda: _env_int("CC_TICKET_SLA_URGENT", 4 * 60))
    """Default time to resolve an urgent ticket (a tenant may set its own)."""
    ticket_sla_minutes_high: int = field(default_factory=lambda: _env_int("CC_TICKET_SLA_HIGH", 8 * 60))
    """Default time to resolve a high-priority ticket."""
    ticket_sla_minutes_normal: int = field(default_factory=lambda: _env_int("CC_TICKET_SLA_NORMAL", 24 * 60))
    """Default time to resolve a normal ticket."""
    ticket_sla_minutes_low: int = field(default_factory=lambda: _env_int("CC_TICKET_SLA_LOW", 72 * 60))
    """Default time to resolve a low-priority ticket."""
    log_level: str = field(default_factory=lambda: _env("CC_LOG_LEVEL", "INFO"))
    """Root log level."""
    log_json: bool = field(default_factory=lambda: _env_bool("CC_LOG_JSON", True))
    """JSON log lines (production, CI) or human-readable ones."""

    def __post_init__(self) -> None:
        if self.environment == "production" and self.secret_key == DEV_SECRET:
            raise RuntimeError("CC_SECRET_KEY must be set in production")
        if len(self.secret_key) < 32:
            raise RuntimeError("CC_SECRET_KEY must be at least 32 characters")
        if self.access_token_ttl_seconds > 900:
            raise RuntimeError("CC_ACCESS_TOKEN_TTL may not exceed 15 minutes")
        if self.esl_lease_renew_seconds * 2 > self.esl_lease_ttl_seconds:
            raise RuntimeError("CC_ESL_LEASE_RENEW must be at most half of CC_ESL_LEASE_TTL (renewed well inside it)")
        if self.call_control_music_seconds < 2:
            raise RuntimeError("CC_CALL_CONTROL_MUSIC_SECONDS must be at least 2 (FreeSWITCH ignores a shorter bound)")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (tests clear the cache after changing the environment)."""
    return Settings()
