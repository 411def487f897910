/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The datapath's maps. Every map is pinned by name in the node's pin
 * directory, so the datapath outlives the agent and a restarted agent (or the
 * other object of the datapath) reuses the same maps. Capacities here are
 * defaults; the agent sets them at load time from its flags. The agent is the
 * only writer of every map except rev_nat, rev_ring, conn_ring, counters,
 * active, pending, sk_mark, failed_flag and failures, which the programs write
 * (the agent only deletes failed_flag entries and consumes failures).
 */
#ifndef HITLESS_MAPS_H
#define HITLESS_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "hitless_types.h"

/* (VIP, port, proto) -> service id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct hl_endpoint);
	__type(value, struct hl_frontend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_frontends SEC(".maps");

/* service id -> slot generation, slot counts, policy. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct hl_service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_services SEC(".maps");

/* (service, slot, table, generation) -> backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct hl_slot_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_slots SEC(".maps");

/* backend id -> address, state, service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct hl_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_backends SEC(".maps");

/* (backend address, port, proto) -> backend id, for clients that dial an
 * instance directly (stale caches). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct hl_endpoint);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_backend_addr SEC(".maps");

/* (socket cookie, backend) -> what the application dialled. LRU: entries of
 * closed sockets age out; it stores addresses, never backend ids, so deleting
 * a backend can never leave an entry pointing nowhere. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct hl_rev_key);
	__type(value, struct hl_rev);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_rev_nat SEC(".maps");

/* cookie % HL_REV_BUCKETS -> the reverse translations of steered TCP sockets
 * (struct hl_rev_bucket). TCP only; UDP keeps rev_nat. 8 MiB. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HL_REV_BUCKETS);
	__type(key, __u32);
	__type(value, struct hl_rev_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_rev_ring SEC(".maps");

/* service id -> counters, per CPU (no atomics on the connect path). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct hl_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_counters SEC(".maps");

/* local backend (address, port, TCP) -> open server-side connections. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct hl_endpoint);
	__type(value, __s64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_active SEC(".maps");

/* Marks a socket counted in hl_active, with the key it was counted under,
 * so that only counted sockets are ever uncounted, exactly once. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct hl_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_sk_mark SEC(".maps");

/* remote backend (address, port, TCP) -> what this node's clients saw of it. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct hl_endpoint);
	__type(value, struct hl_backend_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_backend_stats SEC(".maps");

/* cookie % HL_CONN_SLOTS -> start of an outgoing connect to a backend
 * (struct hl_conn_slot), for the connect latency. 1 MiB. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HL_CONN_SLOTS);
	__type(key, __u32);
	__type(value, struct hl_conn_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_conn_ring SEC(".maps");

/* remote backend (address, port, TCP) -> connects from this node still in
 * their handshake (from TCP_CONNECT_CB to established or failed). A drain is
 * over only when no node has one left to the instance: a SYN dropped by a full
 * accept queue is retransmitted a second later, and would be refused if the
 * instance had been stopped meanwhile. Atomic (not per CPU): the agent must
 * never read a connect's end without its start. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct hl_endpoint);
	__type(value, __s64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_pending SEC(".maps");

/* remote backend (address, port, TCP) -> 1 while a failure of it is signalled in
 * hl_failures and the agent has not looked yet. It rate-limits the signal: a storm
 * of failed connects to one backend costs one event until the agent has read that
 * backend's counters (it deletes the entry first, then reads). The agent sizes it
 * like hl_backends: at most one entry per backend. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct hl_endpoint);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_failed_flag SEC(".maps");

/* Failure signals: records of one struct hl_endpoint, a backend that a connect
 * from this node failed to (at most one outstanding per backend, see
 * hl_failed_flag). The agent sleeps on it and reads only the backends named here,
 * so an idle agent reads no counters. max_entries is bytes (a power of two, a
 * multiple of the page size): 32 per record (8 of header, 20 of endpoint, padded),
 * one record per backend; the agent sets it from --max-backends. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16384 * 32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_failures SEC(".maps");

/* The revision the maps hold, written last by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hl_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hl_meta SEC(".maps");

#endif
