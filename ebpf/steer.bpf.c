// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Steering inside connect(), sendmsg() and recvmsg(), and the reverse
 * translation getpeername() needs. Attached to the node's cgroup, so it runs
 * for every socket of every process in it, whatever its registry cache says.
 *
 *   dial a VIP               -> a serving backend from the service's slots
 *   dial a draining/down     -> a serving sibling (steer), ECONNREFUSED
 *     backend directly          (reject) or untouched (allow), per policy
 *   dial anything else       -> untouched
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "hitless_maps.h"

#define ALLOW 1
#define DENY 0

static __always_inline void ep_v4(struct hl_endpoint *ep, __u32 ip4, __u32 port, __u32 proto)
{
	ep->addr[0] = 0;
	ep->addr[1] = 0;
	ep->addr[2] = bpf_htonl(0x0000ffff);
	ep->addr[3] = ip4;
	ep->port = (__u16)port;
	ep->proto = (__u8)proto;
	ep->pad = 0;
}

static __always_inline void ep_v6(struct hl_endpoint *ep, struct bpf_sock_addr *ctx)
{
	/* user_ip6 allows only 4-byte reads: copy word by word. */
	ep->addr[0] = ctx->user_ip6[0];
	ep->addr[1] = ctx->user_ip6[1];
	ep->addr[2] = ctx->user_ip6[2];
	ep->addr[3] = ctx->user_ip6[3];
	ep->port = (__u16)ctx->user_port;
	ep->proto = (__u8)ctx->protocol;
	ep->pad = 0;
}

static __always_inline void count(__u32 sid, int which)
{
	struct hl_counters *c = bpf_map_lookup_elem(&hl_counters, &sid);

	if (!c)
		return;
	/* Per-CPU value and migration is disabled while we run: no atomics. */
	switch (which) {
	case 0: c->steered++; break;
	case 1: c->redirected++; break;
	case 2: c->refused++; break;
	default: c->passed_draining++; break;
	}
}

/* A serving backend of the service, from the slot table of this socket's
 * family, or NULL when the service has none. */
static __always_inline struct hl_backend *pick(__u32 sid, __u8 table)
{
	/* Two tries: the agent marks a backend draining right after the swap
	 * that took its slots away, and keeps the retired generation until it
	 * overwrites it at the next swap (or trims it a second later). A reader
	 * that raced such an update finds the backend no longer serving (or, in
	 * a trimmed table, no slot) and re-reads the service, which by then
	 * names the new generation. */
#pragma unroll
	for (int attempt = 0; attempt < 2; attempt++) {
		struct hl_service *svc = bpf_map_lookup_elem(&hl_services, &sid);
		struct hl_slot_key key = {};
		struct hl_backend *be;
		__u32 *bid;
		__u32 n;

		if (!svc)
			return NULL;
		n = table == HL_TABLE_V4 ? svc->slots4 : svc->slots6;
		if (n == 0)
			return NULL;
		key.service_id = sid;
		key.slot = (__u16)(bpf_get_prandom_u32() % n);
		key.table = table;
		key.gen = (__u8)svc->gen;
		bid = bpf_map_lookup_elem(&hl_slots, &key);
		if (!bid)
			continue;
		be = bpf_map_lookup_elem(&hl_backends, bid);
		/* The service check guards against a backend id the agent
		 * deleted and then reused for another service. */
		if (be && be->state == HL_STATE_SERVING && be->service_id == sid)
			return be;
	}
	return NULL;
}

static __always_inline int refuse(void)
{
	/* ECONNREFUSED rather than the default EPERM: the caller fails at
	 * once, with the error clients already treat as "try another". */
	bpf_set_retval(-ECONNREFUSED);
	return DENY;
}

/* Decides where a connect or datagram to dst goes. Returns the backend to
 * rewrite to, NULL to leave the socket alone; *deny is set to refuse. */
static __always_inline struct hl_backend *route(struct hl_endpoint *dst, __u8 table, int *deny)
{
	struct hl_frontend *fe = bpf_map_lookup_elem(&hl_frontends, dst);
	struct hl_backend *orig, *be;
	struct hl_service *svc;
	__u32 *bid, sid;

	if (fe) {
		sid = fe->service_id;
		be = pick(sid, table);
		if (!be) {
			count(sid, 2);
			*deny = 1;
			return NULL;
		}
		count(sid, 0);
		return be;
	}

	bid = bpf_map_lookup_elem(&hl_backend_addr, dst);
	if (!bid)
		return NULL;
	orig = bpf_map_lookup_elem(&hl_backends, bid);
	if (!orig || orig->state == HL_STATE_SERVING)
		return NULL;
	sid = orig->service_id;
	svc = bpf_map_lookup_elem(&hl_services, &sid);
	if (!svc || svc->policy == HL_POLICY_ALLOW)
		return NULL;
	if (svc->policy == HL_POLICY_REJECT) {
		count(sid, 2);
		*deny = 1;
		return NULL;
	}
	be = pick(sid, table);
	if (be) {
		count(sid, 1);
		return be;
	}
	/* No serving sibling. A draining instance still serves: better a new
	 * connection to it than a failure. A down one would only time out. */
	if (orig->state == HL_STATE_DRAINING) {
		count(sid, 3);
		return NULL;
	}
	count(sid, 2);
	*deny = 1;
	return NULL;
}

/* Orders plain loads and stores for the compiler; x86-64 keeps stores in order
 * and loads in order (TSO), which is what the ring's cookie check relies on. */
#define barrier() asm volatile("" ::: "memory")

static __always_inline int same_rev(struct hl_rev *a, struct hl_endpoint *b)
{
	return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
	       a->addr[3] == b->addr[3] && a->port == b->port;
}

/* Remembers what the application dialled, for getpeername() and recvmsg().
 *
 * TCP: in hl_rev_ring, a way of the bucket of the socket's cookie (see
 * struct hl_rev_bucket). This used to be an hl_rev_nat insert, ~1.1 us of a
 * ~1.4-1.9 us run (LRU lock, a node off the LRU lists, a cold element);
 * socket-local storage was worse (~1.4 us to create). A TCP socket has one
 * peer, so one way suffices. The cookie is stored before the way: a reader
 * that sees its cookie before and after copying the way saw it whole (see
 * rev_of_ring). Two writers racing for the same way of one bucket
 * lose one entry (getpeername then shows the backend); that takes two steered
 * connects in one of 32768 buckets within a few ns.
 *
 * UDP: hl_rev_nat, keyed by (cookie, backend): one unconnected socket may send
 * to several VIPs and recvmsg() must tell their replies apart. sendmsg() runs
 * this per datagram: look first and write only a missing or changed entry, so
 * a steady flow costs a lookup, not an LRU update per datagram. */
static __always_inline void remember(struct bpf_sock_addr *ctx, struct hl_backend *be, struct hl_endpoint *dst)
{
	struct hl_rev_key key = {};
	struct hl_rev rev = {};
	struct hl_rev *old;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	if (dst->proto == IPPROTO_TCP) {
		__u32 idx = (__u32)cookie & (HL_REV_BUCKETS - 1);
		struct hl_rev_bucket *r = bpf_map_lookup_elem(&hl_rev_ring, &idx);
		__u32 w;

		/* Verifier: an array lookup returns "maybe NULL" whatever the index;
		 * the fallback below is never taken in practice. */
		if (r) {
			/* The socket's own way (a reconnect), else the next one. */
			w = r->next;
#pragma unroll
			for (int i = 0; i < HL_REV_WAYS; i++)
				if (r->cookie[i] == cookie)
					w = i + HL_REV_WAYS; /* marked: no cursor move */
			if (w < HL_REV_WAYS)
				r->next = (w + 1) & (HL_REV_WAYS - 1);
			/* Bounded index for the verifier. */
			w &= HL_REV_WAYS - 1;
			r->cookie[w] = cookie;
			barrier();
			r->way[w].backend.addr[0] = be->addr[0];
			r->way[w].backend.addr[1] = be->addr[1];
			r->way[w].backend.addr[2] = be->addr[2];
			r->way[w].backend.addr[3] = be->addr[3];
			r->way[w].backend.port = be->port;
			r->way[w].dialled.addr[0] = dst->addr[0];
			r->way[w].dialled.addr[1] = dst->addr[1];
			r->way[w].dialled.addr[2] = dst->addr[2];
			r->way[w].dialled.addr[3] = dst->addr[3];
			r->way[w].dialled.port = dst->port;
			return;
		}
	}
	key.cookie = cookie;
	key.addr[0] = be->addr[0];
	key.addr[1] = be->addr[1];
	key.addr[2] = be->addr[2];
	key.addr[3] = be->addr[3];
	key.port = be->port;
	old = bpf_map_lookup_elem(&hl_rev_nat, &key);
	if (old && same_rev(old, dst))
		return;
	rev.addr[0] = dst->addr[0];
	rev.addr[1] = dst->addr[1];
	rev.addr[2] = dst->addr[2];
	rev.addr[3] = dst->addr[3];
	rev.port = dst->port;
	bpf_map_update_elem(&hl_rev_nat, &key, &rev, BPF_ANY);
}

/* What a TCP socket whose peer is `peer` dialled, from the ring, into *out.
 * Returns 0 when no way of the bucket holds the socket (never steered, or
 * evicted by HL_REV_WAYS younger ones) or it holds another peer. */
static __always_inline int rev_of_ring(__u64 cookie, struct hl_endpoint *peer, struct hl_rev *out)
{
	__u32 idx = (__u32)cookie & (HL_REV_BUCKETS - 1);
	struct hl_rev_bucket *r;

	if (peer->proto != IPPROTO_TCP)
		return 0;
	r = bpf_map_lookup_elem(&hl_rev_ring, &idx);
	if (!r)
		return 0;
#pragma unroll
	for (int i = 0; i < HL_REV_WAYS; i++) {
		if (r->cookie[i] == cookie) {
			int hit;

			barrier();
			hit = same_rev(&r->way[i].backend, peer);
			out->addr[0] = r->way[i].dialled.addr[0];
			out->addr[1] = r->way[i].dialled.addr[1];
			out->addr[2] = r->way[i].dialled.addr[2];
			out->addr[3] = r->way[i].dialled.addr[3];
			out->port = r->way[i].dialled.port;
			barrier();
			/* A writer of another socket stores its cookie before the
			 * way: still ours after the copy means the copy is whole. */
			return hit && r->cookie[i] == cookie;
		}
	}
	return 0;
}

static __always_inline int steer4(struct bpf_sock_addr *ctx)
{
	struct hl_endpoint dst;
	struct hl_backend *be;
	int deny = 0;

	ep_v4(&dst, ctx->user_ip4, ctx->user_port, ctx->protocol);
	be = route(&dst, HL_TABLE_V4, &deny);
	if (deny)
		return refuse();
	if (!be)
		return ALLOW;
	/* Remember before rewriting: a reply or getpeername() may come at
	 * once after connect() returns. */
	remember(ctx, be, &dst);
	ctx->user_ip4 = be->addr[3];
	ctx->user_port = be->port;
	return ALLOW;
}

static __always_inline int steer6(struct bpf_sock_addr *ctx)
{
	struct hl_endpoint dst;
	struct hl_backend *be;
	int deny = 0;

	ep_v6(&dst, ctx);
	be = route(&dst, HL_TABLE_V6, &deny);
	if (deny)
		return refuse();
	if (!be)
		return ALLOW;
	remember(ctx, be, &dst);
	/* An IPv4 backend is written IPv4-mapped: a dual-stack socket then
	 * connects over IPv4 (a V6ONLY socket gets ENETUNREACH). */
	ctx->user_ip6[0] = be->addr[0];
	ctx->user_ip6[1] = be->addr[1];
	ctx->user_ip6[2] = be->addr[2];
	ctx->user_ip6[3] = be->addr[3];
	ctx->user_port = be->port;
	return ALLOW;
}

/* The peer a steered socket sees is the backend; show it what it dialled.
 * rev_nat stays the fallback for TCP: it holds the sockets steered by an
 * older program before an upgrade. */
static __always_inline void unsteer4(struct bpf_sock_addr *ctx)
{
	struct hl_endpoint peer;
	struct hl_rev_key key = {};
	struct hl_rev found = {}, *rev = &found;

	ep_v4(&peer, ctx->user_ip4, ctx->user_port, ctx->protocol);
	key.cookie = bpf_get_socket_cookie(ctx);
	if (!rev_of_ring(key.cookie, &peer, &found)) {
		key.addr[2] = peer.addr[2];
		key.addr[3] = peer.addr[3];
		key.port = peer.port;
		rev = bpf_map_lookup_elem(&hl_rev_nat, &key);
		if (!rev)
			return;
	}
	ctx->user_ip4 = rev->addr[3];
	ctx->user_port = rev->port;
}

static __always_inline void unsteer6(struct bpf_sock_addr *ctx)
{
	struct hl_endpoint peer;
	struct hl_rev_key key = {};
	struct hl_rev found = {}, *rev = &found;

	ep_v6(&peer, ctx);
	key.cookie = bpf_get_socket_cookie(ctx);
	if (!rev_of_ring(key.cookie, &peer, &found)) {
		key.addr[0] = peer.addr[0];
		key.addr[1] = peer.addr[1];
		key.addr[2] = peer.addr[2];
		key.addr[3] = peer.addr[3];
		key.port = peer.port;
		rev = bpf_map_lookup_elem(&hl_rev_nat, &key);
		if (!rev)
			return;
	}
	ctx->user_ip6[0] = rev->addr[0];
	ctx->user_ip6[1] = rev->addr[1];
	ctx->user_ip6[2] = rev->addr[2];
	ctx->user_ip6[3] = rev->addr[3];
	ctx->user_port = rev->port;
}

SEC("cgroup/connect4")
int hl_connect4(struct bpf_sock_addr *ctx) { return steer4(ctx); }

SEC("cgroup/connect6")
int hl_connect6(struct bpf_sock_addr *ctx) { return steer6(ctx); }

SEC("cgroup/sendmsg4")
int hl_sendmsg4(struct bpf_sock_addr *ctx) { return steer4(ctx); }

SEC("cgroup/sendmsg6")
int hl_sendmsg6(struct bpf_sock_addr *ctx) { return steer6(ctx); }

SEC("cgroup/recvmsg4")
int hl_recvmsg4(struct bpf_sock_addr *ctx) { unsteer4(ctx); return ALLOW; }

SEC("cgroup/recvmsg6")
int hl_recvmsg6(struct bpf_sock_addr *ctx) { unsteer6(ctx); return ALLOW; }

SEC("cgroup/getpeername4")
int hl_getpeer4(struct bpf_sock_addr *ctx) { unsteer4(ctx); return ALLOW; }

SEC("cgroup/getpeername6")
int hl_getpeer6(struct bpf_sock_addr *ctx) { unsteer6(ctx); return ALLOW; }

char _license[] SEC("license") = "Dual BSD/GPL";
