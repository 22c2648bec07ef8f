"""Every size and time limit of axpolicy in one place, with its source.

Limits are named ``UPPER_SNAKE`` with a unit suffix. Where a limit mirrors
an MTA's own, the upstream name is given so that a reader can check it.
"""

# RFC 5321 4.5.3.1: local part 64 octets, domain 255 octets, path 256
# octets.  Real MTAs accept longer; 320 is the figure used by many
# validators (64 + 1 + 255) and is what the user-map contract promises.
MAX_ADDRESS_BYTES = 320
MAX_LOCAL_PART_BYTES = 64
MAX_DOMAIN_BYTES = 255
MAX_LABEL_BYTES = 63

# Postfix socketmap_max_query_size (3.12 default): no longer key is useful.
MAX_KEY_BYTES = 10000

# Postfix socketmap_max_reply_size default (dict_sockmap.c).
SOCKETMAP_MAX_REPLY_BYTES = 100000

# Postfix DICT_TCP_MAXLEN (dict_tcp.c): the whole reply including LF.
TCP_TABLE_MAX_LINE_BYTES = 4096

# A host value from the user map ends up in a transport nexthop.
MAX_HOST_BYTES = 255

# LDAP: how many entries one search may return before the answer is
# treated as ambiguous (a temporary failure, never a guess).
LDAP_SIZE_LIMIT = 16

# File user map: refuse absurd files rather than eat memory.
FILEMAP_MAX_BYTES = 64 * 1024 * 1024
FILEMAP_MAX_LINE_BYTES = 4096

# The configuration file and a secret file (bind_password_file): refuse a
# wrong path (a log, a device) before it is parsed.
CONFIG_MAX_BYTES = 1024 * 1024
SECRET_MAX_BYTES = 4096

# How often (seconds) a file user map checks whether its file changed.
FILEMAP_CHECK_INTERVAL_SECONDS = 1.0

# Peer-supplied text in log lines is cut to this many characters.
LOG_TEXT_CHARS = 100

# socketmap request: "<name> <key>"; map names are short.
SOCKETMAP_MAX_NAME_BYTES = 100
SOCKETMAP_MAX_REQUEST_BYTES = SOCKETMAP_MAX_NAME_BYTES + 1 + MAX_KEY_BYTES

# tcp_table request line "get <key>": Postfix hex-quotes non-printable
# bytes, so a key can take up to three times its size on the wire.
TCP_TABLE_MAX_REQUEST_BYTES = 4 + 3 * MAX_KEY_BYTES + 2

# Policy delegation: Postfix 3.7 sends about 30 attributes; later versions
# add a few.  smtpd itself applies no limit (attr_scan_plain.c), so these
# are ours.
POLICY_MAX_LINE_BYTES = 8192
POLICY_MAX_ATTRIBUTES = 256
POLICY_MAX_REQUEST_BYTES = 64 * 1024

# Exim readsocket request: "<map> <key>".
READSOCKET_MAX_REQUEST_BYTES = SOCKETMAP_MAX_REQUEST_BYTES + 2

# Requests a single connection may have in flight (pipelined) before
# axpolicy stops reading from it.
PIPELINE_DEPTH = 16

# How often idle and stalled connections are looked for (seconds, at most).
SWEEP_INTERVAL_SECONDS = 1.0

# Listen backlog for every socket.
LISTEN_BACKLOG = 1024

# Exim's default ${readsocket} timeout (expand.c): an answer must come
# well before it, or Exim discards it.
EXIM_READSOCKET_TIMEOUT_SECONDS = 5.0
EXIM_READSOCKET_MARGIN_SECONDS = 0.5

# Postfix closes idle policy connections after smtpd_policy_service_max_idle.
POSTFIX_POLICY_MAX_IDLE_SECONDS = 300.0

# LDAP: operations in flight at once on one connection.  slapd closes an
# anonymous session with more than conn_max_pending (default 100) pending.
LDAP_MAX_OUTSTANDING = 64

# LDAP: the largest answer one search may produce (LDAP_SIZE_LIMIT entries
# with one host attribute each fit many times over).
LDAP_MAX_RESPONSE_BYTES = 1024 * 1024

# Replies to whole table requests kept per listener (axpolicy/replay.py);
# about 400 bytes each (12 MiB when full, docs/benchmarks.rst).
REPLY_MEMO_ENTRIES = 32768

# SMTP AUTH (axpolicy/authn.py): input refused before any search, and how
# much the throttling and the cache of verified pairs may remember.
AUTH_MAX_LOGIN_BYTES = 320
AUTH_MAX_PASSWORD_BYTES = 1024
AUTH_MAX_TRACKED = 100000
AUTH_MAX_CACHED = 100000
AUTH_MAX_FAILURES_KEPT = 1000    # per key: at least max_failures (its largest allowed value)

# Dovecot auth protocol (axpolicy/dovecot.py): Dovecot's own line limit
# (AUTH_CLIENT_MAX_LINE_LENGTH), and unfinished exchanges kept per
# connection (a client may abandon one without saying so).
DOVECOT_MAX_LINE_BYTES = 16384
DOVECOT_MAX_PENDING = 16

# Replica (RFC 4533): a silent sync connection is probed after this long,
# and must answer within the map's timeout.
REPLICA_PROBE_SECONDS = 5.0
# After a lost session: reconnect after 1 s, doubling up to 30 s while the
# server keeps failing.
REPLICA_RETRY_MIN_SECONDS = 1.0
REPLICA_RETRY_MAX_SECONDS = 30.0
# Changes (or UUIDs of a present phase) written to the replica's store in
# one transaction: bounds the pages one commit dirties and the time the
# writer holds the GIL.  Four times as many may wait before the replica
# stops reading from the server (back-pressure).
REPLICA_WRITE_BATCH = 2000
