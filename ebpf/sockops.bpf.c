// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Counts the open server-side connections of every registered backend that
 * listens on this node: what a drain waits on before the instance is stopped.
 * A connection counts from the moment it is established until the
 * application closes it (FIN_WAIT1 or LAST_ACK) or it is reset (CLOSE); a
 * peer's FIN alone (CLOSE_WAIT) leaves it counted, since the instance still
 * holds it.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "hitless_maps.h"

#define READ_CTX(field) (*(volatile __u32 *)&(field))

/* A zeroed backend_stats, to insert new entries from (the value is too large for the
 * BPF stack). Never written. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hl_backend_stats);
} hl_stats_blank SEC(".maps");

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

static __always_inline void count_open(struct bpf_sock_ops *ctx)
{
	struct hl_endpoint ep = {};
	struct hl_endpoint *mark;
	struct bpf_sock *sk;
	__s64 zero = 0, *n;

	/* Read the context once, unconditionally and word by word: clang would
	 * otherwise merge the branches' loads into one through a computed ctx
	 * pointer, or two words into one 8-byte load; the verifier refuses both
	 * (sock_ops allows 4-byte context reads only). */
	__u32 family = ctx->family, ip4 = ctx->local_ip4;
	__u32 ip6_0 = READ_CTX(ctx->local_ip6[0]), ip6_1 = READ_CTX(ctx->local_ip6[1]);
	__u32 ip6_2 = READ_CTX(ctx->local_ip6[2]), ip6_3 = READ_CTX(ctx->local_ip6[3]);
	__u32 port = ctx->local_port;

	if (family == AF_INET) {
		ep.addr[2] = bpf_htonl(0x0000ffff);
		ep.addr[3] = ip4;
	} else if (family == AF_INET6) {
		ep.addr[0] = ip6_0;
		ep.addr[1] = ip6_1;
		ep.addr[2] = ip6_2;
		ep.addr[3] = ip6_3;
	} else {
		return;
	}
	/* local_port is host byte order here, unlike everywhere else. */
	ep.port = bpf_htons((__u16)port);
	ep.proto = IPPROTO_TCP;
	/* Only registered backends: keeps the map as small as the registry. */
	if (!bpf_map_lookup_elem(&hl_backend_addr, &ep))
		return;

	sk = ctx->sk;
	if (!sk)
		return;
	mark = bpf_sk_storage_get(&hl_sk_mark, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!mark)
		return;
	n = bpf_map_lookup_elem(&hl_active, &ep);
	if (!n) {
		bpf_map_update_elem(&hl_active, &ep, &zero, BPF_NOEXIST);
		n = bpf_map_lookup_elem(&hl_active, &ep);
		if (!n) {
			bpf_sk_storage_delete(&hl_sk_mark, sk);
			return;
		}
	}
	*mark = ep;
	__sync_fetch_and_add(n, 1);
	/* Ask for state changes of this socket only; keep other flags. */
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void count_close(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct hl_endpoint *mark;
	__s64 *n;

	if (!sk)
		return;
	/* Only sockets counted above carry a mark: another program may have
	 * asked for state callbacks on sockets we never counted. */
	mark = bpf_sk_storage_get(&hl_sk_mark, sk, 0, 0);
	if (!mark)
		return;
	n = bpf_map_lookup_elem(&hl_active, mark);
	if (n)
		__sync_fetch_and_add(n, -1);
	bpf_sk_storage_delete(&hl_sk_mark, sk);
}

/* The client side: connects from this node to registered backends. */

/* The socket's remote endpoint into *ep; 0 when it is neither IPv4 nor IPv6. */
static __always_inline int remote_ep(struct bpf_sock_ops *ctx, struct hl_endpoint *ep)
{
	__u32 family = ctx->family, ip4 = ctx->remote_ip4;
	__u32 ip6_0 = READ_CTX(ctx->remote_ip6[0]), ip6_1 = READ_CTX(ctx->remote_ip6[1]);
	__u32 ip6_2 = READ_CTX(ctx->remote_ip6[2]), ip6_3 = READ_CTX(ctx->remote_ip6[3]);
	/* sock_ops keeps the legacy layout: the network-order port sits in the
	 * upper 16 bits of remote_port on little-endian machines. */
	__u32 port = ctx->remote_port >> 16;

	if (family == AF_INET) {
		ep->addr[2] = bpf_htonl(0x0000ffff);
		ep->addr[3] = ip4;
	} else if (family == AF_INET6) {
		ep->addr[0] = ip6_0;
		ep->addr[1] = ip6_1;
		ep->addr[2] = ip6_2;
		ep->addr[3] = ip6_3;
	} else {
		return 0;
	}
	ep->port = (__u16)port;
	ep->proto = IPPROTO_TCP;
	return 1;
}

static __always_inline int remote_backend(struct bpf_sock_ops *ctx, struct hl_endpoint *ep)
{
	return remote_ep(ctx, ep) && bpf_map_lookup_elem(&hl_backend_addr, ep) != NULL;
}

/* The stats of the socket's remote endpoint if it is a registered backend, or
 * NULL. An existing stats entry answers both at once (one lookup, the common
 * case); only a backend's first event also looks at the registry. */
static __always_inline struct hl_backend_stats *remote_stats(struct bpf_sock_ops *ctx, struct hl_endpoint *ep)
{
	struct hl_backend_stats *st;

	if (!remote_ep(ctx, ep))
		return NULL;
	st = bpf_map_lookup_elem(&hl_backend_stats, ep);
	if (st)
		return st;
	if (!bpf_map_lookup_elem(&hl_backend_addr, ep))
		return NULL;
	/* Too large for the stack: insert from the zero-filled per-CPU scratch. */
	{
		__u32 zero = 0;
		struct hl_backend_stats *blank = bpf_map_lookup_elem(&hl_stats_blank, &zero);

		if (!blank)
			return NULL;
		bpf_map_update_elem(&hl_backend_stats, ep, blank, BPF_NOEXIST);
	}
	return bpf_map_lookup_elem(&hl_backend_stats, ep);
}

/* Orders plain loads and stores for the compiler; x86-64 keeps stores in order
 * and loads in order (TSO), which is what the ring's cookie check relies on. */
#define barrier() asm volatile("" ::: "memory")

/* The client side keeps no per-socket storage: creating socket-local storage
 * per connect and deleting it at close cost ~2.4 us of ~4.7 us per connection
 * (the whole program ran 7 times per connection). What it stored is either in
 * the context at every callback or not needed:
 *   - the backend: the socket's remote address, looked up again;
 *   - "this socket is ours": we ask for state callbacks (STATE_CB_FLAG) on
 *     sockets that dial a registered backend, and only then count them;
 *   - "it established": the state it closes from (SYN_SENT/SYN_RECV: failed);
 *   - the start of the connect: a slot of hl_conn_ring, a plain store.
 * A connect counts in connects at ACTIVE_ESTABLISHED and in failed or closed
 * at CLOSE, each exactly once per socket, as before. */

/* Adds d to the handshakes in flight to ep; 1 if counted. An entry is created
 * only to count a start, never an end. */
static __always_inline int pending_add(struct hl_endpoint *ep, __s64 d)
{
	__s64 zero = 0, *n = bpf_map_lookup_elem(&hl_pending, ep);

	if (!n) {
		if (d < 0)
			return 0;
		bpf_map_update_elem(&hl_pending, ep, &zero, BPF_NOEXIST);
		n = bpf_map_lookup_elem(&hl_pending, ep);
		if (!n)
			return 0;
	}
	__sync_fetch_and_add(n, d);
	return 1;
}

/* The socket's conn_ring slot if it still belongs to this socket, or NULL. */
static __always_inline struct hl_conn_slot *own_slot(__u64 cookie, __u64 *start)
{
	__u32 idx = (__u32)cookie & (HL_CONN_SLOTS - 1);
	struct hl_conn_slot *slot = bpf_map_lookup_elem(&hl_conn_ring, &idx);

	if (!slot || slot->cookie != cookie)
		return NULL;
	barrier();
	*start = slot->start_ns;
	barrier();
	if (slot->cookie != cookie)
		return NULL;
	return slot;
}

/* The handshake of the socket is over (established or failed): uncount it from
 * pending if it was counted, once. Runs under the socket's lock, as do all
 * callbacks of one socket, so the flag cannot be cleared twice. */
static __always_inline void handshake_over(struct hl_endpoint *ep, struct hl_conn_slot *slot, __u64 start)
{
	if (!slot || !(start & HL_CONN_PENDING))
		return;
	slot->start_ns = start & ~HL_CONN_PENDING;
	pending_add(ep, -1);
}

static __always_inline void connect_started(struct bpf_sock_ops *ctx)
{
	struct hl_endpoint ep = {};
	struct hl_conn_slot *slot;
	__u64 cookie, flag;
	__u32 idx;

	if (!remote_backend(ctx, &ep))
		return;
	cookie = bpf_get_socket_cookie(ctx);
	idx = (__u32)cookie & (HL_CONN_SLOTS - 1);
	slot = bpf_map_lookup_elem(&hl_conn_ring, &idx);
	if (slot) {
		/* Counted only with a slot to remember it by: an uncounted end
		 * would drift the count below the truth. */
		flag = pending_add(&ep, 1) ? HL_CONN_PENDING : 0;
		slot->cookie = cookie;
		barrier();
		slot->start_ns = bpf_ktime_get_ns() | flag;
	}
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void connect_done(struct bpf_sock_ops *ctx)
{
	struct hl_endpoint ep = {};
	struct hl_backend_stats *st;
	struct hl_conn_slot *slot;
	__u64 us, v, start = 0;
	__u32 b = 0;

	/* Not asked for by connect_started: not a connect to a backend. */
	if (!(ctx->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
		return;
	if (!remote_ep(ctx, &ep))
		return;
	slot = own_slot(bpf_get_socket_cookie(ctx), &start);
	handshake_over(&ep, slot, start);
	st = remote_stats(ctx, &ep);
	if (!st)
		return;
	start &= ~HL_CONN_PENDING;
	if (slot && start)
		us = (bpf_ktime_get_ns() - start) / 1000;
	else
		/* The slot went to another socket during the handshake (one of
		 * HL_CONN_SLOTS, so rarely): the handshake's RTT sample (srtt is
		 * the first sample, << 3) still puts the connect in the histogram. */
		us = ctx->srtt_us >> 3;
	v = us;
	/* log2, bounded for the verifier. */
#pragma unroll
	for (int i = 0; i < HL_LAT_BUCKETS - 1; i++) {
		if (v >= 2) {
			v >>= 1;
			b++;
		}
	}
	st->connects++;
	st->latency_us_sum += us;
	if (b < HL_LAT_BUCKETS)
		st->latency[b]++;
}

#define HL_EEXIST 17

/* Tells the agent that a connect to ep failed: one record in hl_failures, then
 * nothing more for ep until the agent has looked (it deletes the flag, then reads
 * the counters). Failure path only: a connect that establishes pays nothing.
 * The insert is unconditional, with no lookup first: it takes the bucket lock,
 * which orders the failed++ before it against the agent's delete-then-read. With
 * a plain lookup, this program could see the flag still set while the agent read
 * the count without this failure; it would then wait for the next failure. */
static __always_inline void signal_failure(struct hl_endpoint *ep)
{
	__u8 one = 1;
	long err = bpf_map_update_elem(&hl_failed_flag, ep, &one, BPF_NOEXIST);

	if (err == -HL_EEXIST)
		return;
	/* A full flag map (err != 0) still signals, unthrottled; a full ring
	 * drops the flag, so the next failure tries again. */
	if (bpf_ringbuf_output(&hl_failures, ep, sizeof(*ep), 0) && !err)
		bpf_map_delete_elem(&hl_failed_flag, ep);
}

/* The one field of the kernel's struct sock read here, relocated by name against
 * the running kernel's BTF when the object is loaded (CO-RE): no kernel headers. */
struct sock___hl {
	int sk_err;
} __attribute__((preserve_access_index));

/* Whether the socket closes on an error: a reset received (ECONNRESET, EPIPE) or a
 * timeout (ETIMEDOUT), as tcp_reset() and tcp_write_err() set before tcp_done(). */
static __always_inline int closed_by_error(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock___hl *full;

	if (!sk)
		return 0;
	/* tcp_sock begins with struct sock: the same offsets. */
	full = (struct sock___hl *)bpf_skc_to_tcp_sock(sk);
	if (!full)
		return 0;
	return full->sk_err != 0;
}

static __always_inline void connect_closed(struct bpf_sock_ops *ctx, __u32 old_state)
{
	struct hl_endpoint ep = {};
	struct hl_backend_stats *st;

	/* Only sockets with state callbacks get here; the remote address is
	 * still set (the kernel clears it after this callback). */
	if (remote_ep(ctx, &ep)) {
		/* Whatever state it closes from, a handshake still counted is over. */
		__u64 start = 0;
		struct hl_conn_slot *slot = own_slot(bpf_get_socket_cookie(ctx), &start);

		handshake_over(&ep, slot, start);
	}
	st = remote_stats(ctx, &ep);
	if (!st)
		return;
	if (old_state == BPF_TCP_SYN_SENT || old_state == BPF_TCP_SYN_RECV) {
		/* Never established (refused, reset, timed out). */
		st->failed++;
		signal_failure(&ep);
		return;
	}
	st->closed++;
	/* A reset counts only when the peer sent it (or the connection timed
	 * out): the kernel sets the socket's error before it closes it. A client
	 * that aborts its own connection (SO_LINGER 0) closes with no error. */
	if (closed_by_error(ctx))
		st->resets++;
	st->retrans += ctx->total_retrans;
	st->bytes_in += ctx->bytes_received;
	st->bytes_out += ctx->bytes_acked;
	st->srtt_us_sum += ctx->srtt_us >> 3;
}

SEC("sockops")
int hl_sockops(struct bpf_sock_ops *ctx)
{
	switch (ctx->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		count_open(ctx);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		connect_started(ctx);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		connect_done(ctx);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[1] is the new state. */
		if (ctx->args[1] == BPF_TCP_FIN_WAIT1 || ctx->args[1] == BPF_TCP_LAST_ACK ||
		    ctx->args[1] == BPF_TCP_CLOSE)
			count_close(ctx);
		if (ctx->args[1] == BPF_TCP_CLOSE)
			connect_closed(ctx, ctx->args[0]);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
