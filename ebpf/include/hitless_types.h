/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Types shared by the datapath and the agent. Every struct here is mirrored
 * in agent/src/abi.rs, which asserts the same sizes and offsets: change both
 * or the tests fail.
 *
 * Addresses are always 16 bytes in network byte order; an IPv4 address is
 * stored IPv4-mapped (::ffff:a.b.c.d), so one key format serves both
 * families and an AF_INET6 socket dialling a v4-mapped VIP matches too.
 * Ports are network byte order.
 */
#ifndef HITLESS_TYPES_H
#define HITLESS_TYPES_H

#include <linux/types.h>

/* Backend states. Only SERVING backends ever get slots. */
#define HL_STATE_SERVING 0
#define HL_STATE_DRAINING 1
#define HL_STATE_DOWN 2

/* What a direct connect to a draining or down backend does. */
#define HL_POLICY_STEER 0  /* to a serving sibling of the same service */
#define HL_POLICY_REJECT 1 /* refused at once with ECONNREFUSED */
#define HL_POLICY_ALLOW 2  /* left alone */

/* Slot tables: one per client socket family, because an AF_INET socket can
 * only be steered to IPv4 backends while an AF_INET6 one reaches both. */
#define HL_TABLE_V4 4
#define HL_TABLE_V6 6

/* Highest slot count of one table; weights are scaled down to fit. */
#define HL_MAX_SLOTS 1024

/* A VIP or a backend address: frontends and backend_by_addr keys,
 * and the key of the active connection counts. */
struct hl_endpoint {
	__u32 addr[4];
	__u16 port;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

/* frontends value. */
struct hl_frontend {
	__u32 service_id;
	__u32 flags; /* reserved, 0 */
};

/* services value. The agent replaces it with a single map update, which the
 * kernel swaps in atomically (hash maps replace the element under RCU), so a
 * reader sees the old generation and counts or the new ones, never a mix. */
struct hl_service {
	__u32 gen;     /* slot generation in force, 0 or 1 */
	__u16 slots4;  /* slots in table HL_TABLE_V4 of that generation */
	__u16 slots6;  /* slots in table HL_TABLE_V6 of that generation */
	__u8 policy;   /* HL_POLICY_* */
	__u8 pad[3];
};

/* slots key; the value is a backend id (__u32). */
struct hl_slot_key {
	__u32 service_id;
	__u16 slot;
	__u8 table; /* HL_TABLE_V4 or HL_TABLE_V6 */
	__u8 gen;
};

/* backends value, keyed by backend id (__u32). */
struct hl_backend {
	__u32 addr[4];
	__u16 port;
	__u8 state;  /* HL_STATE_* */
	__u8 family; /* 4 or 6: which sockets can reach it */
	__u32 service_id;
};

/* rev_nat key: a socket and the backend it was steered to. */
struct hl_rev_key {
	__u64 cookie;
	__u32 addr[4];
	__u16 port;
	__u16 pad0;
	__u32 pad1;
};

/* rev_nat value: what the application dialled. */
struct hl_rev {
	__u32 addr[4];
	__u16 port;
	__u16 pad;
};

/* Per-socket state that must be cheap to write on every connect lives in
 * arrays indexed by the socket cookie: an array lookup the verifier inlines
 * plus plain stores, with no allocation, lock or LRU list. Socket-local
 * storage (bpf_sk_storage_get with F_CREATE) costs ~1.4 us per socket on the
 * reference machine and an LRU hash insert ~1.1 us; a slot write ~0.1 us.
 * The index is the cookie's low bits, not a hash of it: consecutive sockets
 * then use consecutive memory (a hashed index measured ~0.25 us slower: cache
 * and TLB misses). A slot is valid only while it holds the reader's cookie;
 * readers treat a miss as "not recorded" and fall back (see steer.bpf.c and
 * sockops.bpf.c). */

/* rev_ring: the reverse translation of steered TCP sockets, in buckets of
 * HL_REV_WAYS ways; a new socket takes its own way (a reconnect) or the next
 * one round-robin, i.e. the way written longest ago. An entry goes after HL_REV_WAYS younger steered sockets
 * whose cookies fall in its bucket: after ~HL_REV_BUCKETS * HL_REV_WAYS =
 * 131072 younger cookies (the default --max-connections of rev_nat; 8 MiB;
 * the kernel numbers sockets only when asked for a cookie). Ways,
 * not a direct map: the kernel hands cookies to CPUs in batches of 4096, and
 * a CPU using an old batch would share slots with another CPU's current batch
 * and lose young entries at once; a bucket absorbs such overlaps unless
 * HL_REV_WAYS CPUs overlap at one moment. rev_nat (LRU) also kept entries
 * that getpeername() kept using; this keeps by age only. */
#define HL_REV_BUCKETS 32768 /* power of two */
#define HL_REV_WAYS 4

struct hl_rev_way {
	struct hl_rev backend; /* where the socket was steered to */
	struct hl_rev dialled; /* what the application dialled */
	__u64 pad;
};

/* rev_ring value: one bucket; the cookies and the round-robin cursor share
 * its first cache line, so a writer or reader touches that line and one way. */
struct hl_rev_bucket {
	__u64 cookie[HL_REV_WAYS]; /* 0: empty */
	__u32 next;                /* the way the next new socket takes */
	__u32 pad[7];
	struct hl_rev_way way[HL_REV_WAYS];
};

/* conn_ring: when an outgoing connect to a backend started, one way per slot
 * (it is needed for one handshake only; a slot lost to an overlapping batch
 * costs the exact latency of that connect, not its count). */
#define HL_CONN_SLOTS 65536 /* power of two */

struct hl_conn_slot {
	__u64 cookie;
	__u64 start_ns; /* bpf_ktime_get_ns(), | HL_CONN_PENDING while counted in pending */
};

/* Set in hl_conn_slot.start_ns while the connect is counted in hl_pending, cleared
 * when it is uncounted. ktime never reaches bit 63, and programs before this flag
 * never set it, so a socket is uncounted only if it was counted, exactly once. */
#define HL_CONN_PENDING (1ULL << 63)

/* counters value (per CPU), indexed by service id. */
struct hl_counters {
	__u64 steered;      /* VIP connects and datagrams sent to a backend */
	__u64 redirected;   /* direct connects moved off a draining/down backend */
	__u64 refused;      /* refused: no serving backend, or policy reject */
	__u64 passed_draining; /* direct connects let through to a draining backend */
};

/* Connect latency histogram: bucket b counts connects that took [2^b, 2^(b+1)) µs;
 * the first also takes < 1 µs, the last everything from 2^15 µs (32.8 ms) up. */
#define HL_LAT_BUCKETS 16

/* backend_stats value (per CPU), keyed by a remote backend endpoint: what the
 * clients on this node saw of it. */
struct hl_backend_stats {
	__u64 connects;       /* connects that established */
	__u64 failed;         /* connects that never established (refused, reset, timed out) */
	__u64 closed;         /* established connections that closed */
	__u64 retrans;        /* retransmits of the closed connections */
	__u64 bytes_in;       /* bytes received on the closed connections */
	__u64 bytes_out;      /* bytes acked on the closed connections */
	__u64 srtt_us_sum;    /* smoothed RTT at close, summed over closed */
	__u64 latency_us_sum; /* connect latency, summed over connects */
	__u64 latency[HL_LAT_BUCKETS];
	__u64 resets;         /* established connections that went straight to CLOSE */
};

/* meta value (array of one): what the agent last wrote, kept in the kernel so
 * it survives the agent. */
struct hl_meta {
	__u64 revision; /* registry revision the maps hold */
	__u64 applied_at_ns; /* CLOCK_REALTIME of that apply */
};

/* The same layouts are asserted in agent/src/abi.rs. */
_Static_assert(sizeof(struct hl_endpoint) == 20, "hl_endpoint");
_Static_assert(sizeof(struct hl_frontend) == 8, "hl_frontend");
_Static_assert(sizeof(struct hl_service) == 12, "hl_service");
_Static_assert(sizeof(struct hl_slot_key) == 8, "hl_slot_key");
_Static_assert(sizeof(struct hl_backend) == 24, "hl_backend");
_Static_assert(__builtin_offsetof(struct hl_backend, service_id) == 20, "hl_backend.service_id");
_Static_assert(sizeof(struct hl_rev_key) == 32, "hl_rev_key");
_Static_assert(__builtin_offsetof(struct hl_rev_key, port) == 24, "hl_rev_key.port");
_Static_assert(sizeof(struct hl_rev) == 20, "hl_rev");
_Static_assert(sizeof(struct hl_rev_way) == 48, "hl_rev_way");
_Static_assert(sizeof(struct hl_rev_bucket) == 256, "hl_rev_bucket");
_Static_assert(sizeof(struct hl_conn_slot) == 16, "hl_conn_slot");
_Static_assert(sizeof(struct hl_counters) == 32, "hl_counters");
_Static_assert(sizeof(struct hl_meta) == 16, "hl_meta");
_Static_assert(sizeof(struct hl_backend_stats) == 200, "hl_backend_stats");
_Static_assert(__builtin_offsetof(struct hl_backend_stats, resets) == 192, "hl_backend_stats.resets");
_Static_assert(__builtin_offsetof(struct hl_backend_stats, latency) == 64, "hl_backend_stats.latency");

#endif
