/* weft's workload policy programs: tc classifiers on both directions of each workload's host-side
 * veth. The policy itself is data (weft.renderers.bpf_policy explains the encoding); these
 * programs only look it up, so their cost per packet does not depend on how many policies or
 * rules there are:
 *
 *   1. connection tracking (weft_ct): a packet of a connection already allowed passes at once
 *      (replies included), unless the policy of the direction that allowed the connection has
 *      changed since (its digest): then the connection's opening packet is judged again by the
 *      policy now in force, and the connection is kept if it is still allowed, cut if not;
 *   2. a new connection: endpoint (weft_eps) -> profile and classifiers; classify the source and
 *      the destination address (weft_cls, longest prefix); verdict by (profile, classes,
 *      protocol) (weft_verdicts), refined by destination and source port (weft_ports, longest
 *      prefix) where the verdict depends on them.
 *
 * Semantics kept from weft's iptables data plane: only IPv4 is policed (weft renders no
 * ip6tables rules yet); connections the host opens to a workload are not (iptables sees them
 * in OUTPUT, which weft does not hook), their replies pass; a packet conntrack would call
 * INVALID (an ICMP error about no tracked connection, a TCP segment that cannot open one) is
 * dropped; an interface without an endpoint entry drops everything (fail closed). A later
 * fragment of a datagram passes: it has no ports, and its first fragment was judged.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>

#include "maps.h"

#define NSEC 1000000000ULL
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

struct l4 {
    __u32 saddr;
    __u32 daddr;
    __u16 sport;        /* connection identity (network order); ICMP queries: the identifier */
    __u16 dport;
    __u16 pol_sport;    /* what policy matches on (network order); ICMP: 0 and type << 8 | code */
    __u16 pol_dport;
    __u8 proto;
    __u8 tcp_flags;
    __u8 icmp_type;
    __u8 pad;
    __u32 l4off;        /* where the transport header starts */
};

static __always_inline __u32 classify(__u32 classifier, __u32 addr)
{
    if (classifier == 0)
        return 0;
    struct weft_cls_key key = {.prefixlen = 64, .classifier = classifier, .addr = addr};
    __u32 *class = weft_cls.lookup(&key);
    return class ? *class : 0;
}

/* The verdict of `profile` for one packet; never a table reference (a missing entry denies). */
static __always_inline struct weft_verdict judge(__u32 profile, __u32 src_classifier, __u32 dst_classifier,
                                                 __u32 saddr, __u32 daddr, __u8 proto,
                                                 __u16 pol_sport, __u16 pol_dport)
{
    struct weft_verdict out = {.action = WEFT_DENY};
    if (profile == WEFT_PROFILE_OPEN) {
        out.action = WEFT_ALLOW;
        return out;
    }
    if (profile == WEFT_PROFILE_CLOSED)
        return out;
    struct weft_verdict_key vk = {};
    vk.profile = profile;
    vk.src_class = classify(src_classifier, saddr);
    vk.dst_class = classify(dst_classifier, daddr);
    vk.proto = proto;
    struct weft_verdict *v = weft_verdicts.lookup(&vk);
    if (!v) {
        vk.proto = 0;
        vk.any_proto = 1;
        v = weft_verdicts.lookup(&vk);
    }
    if (v && (v->action == WEFT_DPORTS || v->action == WEFT_SPORTS)) {
        struct weft_port_key pk = {.prefixlen = 48, .table = v->arg};
        pk.port = v->action == WEFT_DPORTS ? pol_dport : pol_sport;
        v = weft_ports.lookup(&pk);
    }
    if (v && (v->action == WEFT_DPORTS || v->action == WEFT_SPORTS)) {
        struct weft_port_key pk = {.prefixlen = 48, .table = v->arg};
        pk.port = v->action == WEFT_DPORTS ? pol_dport : pol_sport;
        v = weft_ports.lookup(&pk);
    }
    if (v && (v->action == WEFT_ALLOW || v->action == WEFT_DENY))
        out = *v;
    return out;
}

static __always_inline void count(__u32 ifindex, __u32 rule, __u32 bytes)
{
    struct weft_count_key key = {.ifindex = ifindex, .rule = rule};
    struct weft_count *c = weft_counters.lookup(&key);
    if (c) {
        c->packets += 1;
        c->bytes += bytes;
    } else {
        struct weft_count first = {.packets = 1, .bytes = bytes};
        weft_counters.update(&key, &first);
    }
}

static __always_inline void log_packet(struct weft_verdict *v, struct l4 *p, __u32 ifindex, int dir)
{
    struct weft_log_event e = {.log_id = v->arg, .ifindex = ifindex, .saddr = p->saddr, .daddr = p->daddr,
                               .sport = p->pol_sport, .dport = p->pol_dport, .proto = p->proto,
                               .direction = dir, .action = v->action};
    weft_log.ringbuf_output(&e, sizeof(e), 0);
}

static __always_inline void ct_key(struct weft_ct_key *k, __u32 ifindex, __u32 saddr, __u16 sport,
                                   __u32 daddr, __u16 dport, __u8 proto, __u8 *sender_is_a)
{
    k->ifindex = ifindex;
    k->proto = proto;
    if (saddr < daddr || (saddr == daddr && sport <= dport)) {
        k->addr_a = saddr; k->port_a = sport; k->addr_b = daddr; k->port_b = dport;
        *sender_is_a = 1;
    } else {
        k->addr_a = daddr; k->port_a = dport; k->addr_b = saddr; k->port_b = sport;
        *sender_is_a = 0;
    }
}

static __always_inline __u64 ct_timeout(struct weft_ct *ct, __u8 proto)
{
    if (proto == IPPROTO_TCP) {
        if ((ct->flags & WEFT_CT_RST) || (ct->flags & (WEFT_CT_FIN_A | WEFT_CT_FIN_B)) == (WEFT_CT_FIN_A | WEFT_CT_FIN_B))
            return 10 * NSEC;
        return 432000 * NSEC;       /* the kernel's established timeout: 5 days */
    }
    if (proto == IPPROTO_UDP)
        return 120 * NSEC;
    if (proto == IPPROTO_ICMP)
        return 30 * NSEC;
    return 600 * NSEC;
}

/* Reads the packet's addresses, protocol and ports. 0: judge it; 1: pass it untouched (not
 * IPv4, a later fragment); -1: drop it (truncated). */
static __always_inline int parse(struct __sk_buff *skb, struct l4 *p, __u32 *inner_off)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return 1;
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
        return -1;
    if (bpf_ntohs(ip.frag_off) & 0x1fff)
        return 1;                   /* no transport header: its first fragment was judged */
    p->saddr = ip.saddr;
    p->daddr = ip.daddr;
    p->proto = ip.protocol;
    __u32 off = ETH_HLEN + ip.ihl * 4;
    p->l4off = off;
    __u8 hdr[14] = {};
    if (ip.protocol == IPPROTO_TCP) {
        if (bpf_skb_load_bytes(skb, off, hdr, 14) < 0)
            return -1;
        p->tcp_flags = hdr[13];
    } else if (ip.protocol == IPPROTO_UDP || ip.protocol == IPPROTO_SCTP || ip.protocol == IPPROTO_ICMP) {
        if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
            return -1;
    } else {
        return 0;
    }
    if (ip.protocol == IPPROTO_ICMP) {
        p->icmp_type = hdr[0];
        __builtin_memcpy(&p->pol_dport, &hdr[0], 2);     /* network order: type, then code */
        __builtin_memcpy(&p->sport, &hdr[4], 2);
        p->dport = p->sport;
        *inner_off = off + 8;
    } else {
        __builtin_memcpy(&p->sport, &hdr[0], 2);
        __builtin_memcpy(&p->dport, &hdr[2], 2);
        p->pol_sport = p->sport;
        p->pol_dport = p->dport;
    }
    return 0;
}

static __always_inline int is_icmp_error(__u8 type)
{
    return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
}

static __always_inline int is_icmp_query(__u8 type)
{
    return type == 8 || type == 13 || type == 15 || type == 17;
}

/* An ICMP error belongs to the connection of the packet it quotes: pass it if that connection
 * is tracked here (conntrack's RELATED), drop it otherwise (INVALID). */
static __always_inline int related(struct __sk_buff *skb, __u32 off, __u32 ifindex)
{
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
        return TC_ACT_SHOT;
    __u8 hdr[8] = {};
    if (bpf_skb_load_bytes(skb, off + ip.ihl * 4, hdr, 8) < 0)
        return TC_ACT_SHOT;
    __u16 sport = 0, dport = 0;
    if (ip.protocol == IPPROTO_ICMP) {
        __builtin_memcpy(&sport, &hdr[4], 2);
        dport = sport;
    } else if (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP || ip.protocol == IPPROTO_SCTP) {
        __builtin_memcpy(&sport, &hdr[0], 2);
        __builtin_memcpy(&dport, &hdr[2], 2);
    }
    struct weft_ct_key key = {};
    __u8 sender_is_a;
    ct_key(&key, ifindex, ip.saddr, sport, ip.daddr, dport, ip.protocol, &sender_is_a);
    return weft_ct.lookup(&key) ? TC_ACT_OK : TC_ACT_SHOT;
}

/* --- Services: the client's side translates, both ways. -------------------------------------
 * A workload's packet to a service address (weft_svcs) is sent to one of its backends (chosen at
 * random, or the client's last one under ClientIP affinity) before policy judges it, so policy
 * sees the backend, as Kubernetes specifies; the translation is kept both ways (weft_nat), and
 * replies get the service address back on their way into the client (after policy and tracking,
 * which know the connection by its backend). */

static __always_inline int rewrite(struct __sk_buff *skb, struct l4 *p, int dst, __u32 addr, __u16 port)
{
    __u32 old_addr = dst ? p->daddr : p->saddr;
    __u16 old_port = dst ? p->dport : p->sport;
    __u32 csum = p->l4off + (p->proto == IPPROTO_TCP ? 16 : 6);
    __u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    if (bpf_l4_csum_replace(skb, csum, old_addr, addr, mangled | BPF_F_PSEUDO_HDR | 4) < 0 ||
        bpf_l4_csum_replace(skb, csum, old_port, port, mangled | 2) < 0 ||
        bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_addr, addr, 4) < 0 ||
        bpf_skb_store_bytes(skb, ETH_HLEN + (dst ? 16 : 12), &addr, 4, 0) < 0 ||
        bpf_skb_store_bytes(skb, p->l4off + (dst ? 2 : 0), &port, 2, 0) < 0)
        return -1;
    return 0;
}

/* A connection opened straight to an address and port that an earlier, translated connection
 * of the same client port went to: its replies must not get the service address put back. */
static __always_inline void forget_reverse(struct l4 *p)
{
    struct weft_nat_key rk = {.saddr = p->daddr, .daddr = p->saddr, .sport = p->dport, .dport = p->sport,
                              .proto = p->proto};
    weft_nat.delete(&rk);
}

/* 1: translated; 0: not to a service address; -1: drop (a service without backends). */
static __always_inline int to_service(struct __sk_buff *skb, struct l4 *p, __u64 now, int *opening_direct)
{
    if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
        return 0;
    int opening = p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
    struct weft_svc_key sk = {.addr = p->daddr, .port = p->dport, .proto = p->proto};
    struct weft_svc *svc = weft_svcs.lookup(&sk);
    if (!svc) {
        *opening_direct = p->proto == IPPROTO_UDP ? 2 : opening;    /* 2: if not tracked */
        return 0;
    }
    struct weft_nat_key fk = {.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
                              .proto = p->proto};
    struct weft_nat *fwd = weft_nat.lookup(&fk);
    __u32 baddr;
    __u16 bport;
    if (fwd && !opening) {
        fwd->seen = now;
        baddr = fwd->addr;
        bport = fwd->port;
    } else {
        __u32 count = svc->count;
        if (count == 0)
            return -1;
        __u32 index = bpf_get_prandom_u32() % count;
        struct weft_aff_key ak = {.client = p->saddr, .id = svc->id};
        if (svc->affinity) {
            struct weft_aff *a = weft_aff.lookup(&ak);
            if (a && now - a->seen < (__u64)svc->affinity * NSEC && a->index < count) {
                struct weft_backend_key last = {.id = svc->id, .index = a->index};
                struct weft_backend *b = weft_backends.lookup(&last);
                if (b && b->addr == a->addr && b->port == a->port)
                    index = a->index;
            }
        }
        struct weft_backend_key bk = {.id = svc->id, .index = index};
        struct weft_backend *b = weft_backends.lookup(&bk);
        if (!b)
            return -1;
        baddr = b->addr;
        bport = b->port;
        if (svc->affinity) {
            struct weft_aff chosen = {.seen = now, .addr = baddr, .port = bport, .index = index};
            weft_aff.update(&ak, &chosen);
        }
        struct weft_nat f = {.seen = now, .addr = baddr, .port = bport};
        weft_nat.update(&fk, &f);
        struct weft_nat_key rk = {.saddr = baddr, .daddr = p->saddr, .sport = bport, .dport = p->sport,
                                  .proto = p->proto};
        struct weft_nat r = {.seen = now, .addr = p->daddr, .port = p->dport};
        weft_nat.update(&rk, &r);
    }
    if (rewrite(skb, p, 1, baddr, bport) < 0)
        return -1;
    p->daddr = baddr;
    p->dport = bport;
    p->pol_dport = bport;
    return 1;
}

/* A reply from a backend on its way into the client: the service address back as its source. */
static __always_inline int from_service(struct __sk_buff *skb)
{
    struct l4 p = {};
    __u32 inner = 0;
    if (parse(skb, &p, &inner) != 0 || (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP))
        return TC_ACT_OK;
    struct weft_nat_key rk = {.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport, .dport = p.dport,
                              .proto = p.proto};
    struct weft_nat *r = weft_nat.lookup(&rk);
    if (!r)
        return TC_ACT_OK;
    r->seen = bpf_ktime_get_ns();
    return rewrite(skb, &p, 0, r->addr, r->port) < 0 ? TC_ACT_SHOT : TC_ACT_OK;
}

/* --- Hairpin: a pod sent to a service address, and is the backend chosen. -------------------
 * Its own address as the source would be dropped as a martian when the packet came back to it,
 * so the service address stands in as the source (kube-proxy masquerades to the node's), and
 * the packet goes straight back out of the veth it came in by (bpf_redirect: no routing, whose
 * strict rp_filter would drop that source). A weft_nat entry marked HAIRPIN, keyed by the pod's
 * reply (pod:target -> service address:client port), turns the replies back the same way; the
 * usual reverse entry then puts the service address and port on them as for any client. The
 * connection's way in is judged as one from the host (never policed: Kubernetes always allows
 * a pod's traffic from its node), its way out by the pod's egress policy, as for any client. */
#define WEFT_NAT_HAIRPIN 1          /* weft_nat value `pad`: a hairpin reply entry */

static __always_inline int turn_back(struct __sk_buff *skb)
{
    __u8 mac[12];
    if (bpf_skb_load_bytes(skb, 0, mac, 12) < 0 || bpf_skb_store_bytes(skb, 0, mac + 6, 6, 0) < 0 ||
        bpf_skb_store_bytes(skb, 6, mac, 6, 0) < 0)
        return TC_ACT_SHOT;
    return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int hairpin(struct __sk_buff *skb, struct l4 *p)
{
    if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
        return TC_ACT_OK;
    if (p->saddr == p->daddr) {
        struct weft_nat_key rk = {.saddr = p->daddr, .daddr = p->saddr, .sport = p->dport, .dport = p->sport,
                                  .proto = p->proto};
        struct weft_nat *r = weft_nat.lookup(&rk);
        if (!r)
            return TC_ACT_OK;       /* not through a service: the pod talks to itself by its address */
        __u32 vip = r->addr;
        struct weft_nat_key hk = {.saddr = p->saddr, .daddr = vip, .sport = p->dport, .dport = p->sport,
                                  .proto = p->proto};
        struct weft_nat back = {.seen = bpf_ktime_get_ns(), .addr = p->saddr, .port = p->sport,
                                .pad = WEFT_NAT_HAIRPIN};
        weft_nat.update(&hk, &back);
        if (rewrite(skb, p, 0, vip, p->sport) < 0)
            return TC_ACT_SHOT;
        return turn_back(skb);
    }
    struct weft_nat_key hk = {.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
                              .proto = p->proto};
    struct weft_nat *h = weft_nat.lookup(&hk);
    if (!h || h->pad != WEFT_NAT_HAIRPIN || h->addr != p->saddr)
        return TC_ACT_OK;
    h->seen = bpf_ktime_get_ns();
    if (rewrite(skb, p, 1, h->addr, h->port) < 0)
        return TC_ACT_SHOT;
    return turn_back(skb);
}

/* A hairpinned connection's way in (service address -> pod): the pod's HAIRPIN entry exists. */
static __always_inline int hairpinned(struct l4 *p)
{
    if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
        return 0;
    struct weft_nat_key hk = {.saddr = p->daddr, .daddr = p->saddr, .sport = p->dport, .dport = p->sport,
                              .proto = p->proto};
    struct weft_nat *h = weft_nat.lookup(&hk);
    return h && h->pad == WEFT_NAT_HAIRPIN && h->addr == p->daddr;
}

static __always_inline int handle(struct __sk_buff *skb, const int dir, struct l4 *pp)
{
    struct l4 p = {};
    __u32 inner = 0;
    int parsed = parse(skb, &p, &inner);
    if (parsed > 0)
        return TC_ACT_OK;
    if (parsed < 0)
        return TC_ACT_SHOT;
    __u32 ifindex = skb->ifindex;
    struct weft_ep *ep = weft_eps.lookup(&ifindex);
    if (!ep)
        return TC_ACT_SHOT;

    __u64 now = bpf_ktime_get_ns();
    int direct = 0;
    if (dir == WEFT_DIR_EGRESS && to_service(skb, &p, now, &direct) < 0)
        return TC_ACT_SHOT;
    if (direct == 1)
        forget_reverse(&p);
    struct weft_ct_key key = {};
    __u8 sender_is_a;
    ct_key(&key, ifindex, p.saddr, p.sport, p.daddr, p.dport, p.proto, &sender_is_a);
    struct weft_ct *ct = weft_ct.lookup(&key);
    if (ct && now - ct->seen > ct_timeout(ct, p.proto)) {
        weft_ct.delete(&key);
        ct = 0;
    }
    if (ct) {
        __u8 origin = ct->origin;
        if (origin <= WEFT_DIR_INGRESS) {
            __u32 digest = origin == WEFT_DIR_EGRESS ? ep->digest[WEFT_DIR_EGRESS] : ep->digest[WEFT_DIR_INGRESS];
            if (digest != ct->digest) {
                /* The policy changed since this connection was allowed: judge its opening packet again. */
                __u32 osrc = ct->origin_is_a ? key.addr_a : key.addr_b;
                __u32 odst = ct->origin_is_a ? key.addr_b : key.addr_a;
                struct weft_verdict v;
                if (origin == WEFT_DIR_EGRESS)
                    v = judge(ep->profile[0], ep->classifier[0][0], ep->classifier[0][1], osrc, odst, p.proto,
                              ct->pol_sport, ct->pol_dport);
                else
                    v = judge(ep->profile[1], ep->classifier[1][0], ep->classifier[1][1], osrc, odst, p.proto,
                              ct->pol_sport, ct->pol_dport);
                count(ifindex, v.rule, 0);
                if (v.action != WEFT_ALLOW) {
                    weft_ct.delete(&key);
                    return TC_ACT_SHOT;
                }
                ct->digest = digest;
            }
        }
        ct->seen = now;
        if (p.proto == IPPROTO_TCP) {
            if (p.tcp_flags & TCP_RST)
                ct->flags |= WEFT_CT_RST;
            if (p.tcp_flags & TCP_FIN)
                ct->flags |= sender_is_a ? WEFT_CT_FIN_A : WEFT_CT_FIN_B;
        }
        *pp = p;
        return TC_ACT_OK;
    }

    /* Not part of a tracked connection. */
    if (direct == 2)
        forget_reverse(&p);
    if (p.proto == IPPROTO_ICMP && is_icmp_error(p.icmp_type))
        return related(skb, inner, ifindex);
    if (p.proto == IPPROTO_ICMP && !is_icmp_query(p.icmp_type))
        return TC_ACT_SHOT;         /* a reply without its query */
    if (p.proto == IPPROTO_TCP) {
        __u8 f = p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN);
        if (f != TCP_SYN && f != TCP_ACK)
            return TC_ACT_SHOT;     /* cannot open a connection */
    }
    struct weft_ct fresh = {.seen = now, .pol_sport = p.pol_sport, .pol_dport = p.pol_dport,
                            .origin_is_a = sender_is_a};
    if (dir == WEFT_DIR_INGRESS && (skb->ingress_ifindex == 0 || hairpinned(&p))) {
        fresh.origin = WEFT_ORIGIN_HOST;
        weft_ct.update(&key, &fresh);
        *pp = p;
        return TC_ACT_OK;
    }
    struct weft_verdict v = judge(ep->profile[dir], ep->classifier[dir][0], ep->classifier[dir][1],
                                  p.saddr, p.daddr, p.proto, p.pol_sport, p.pol_dport);
    count(ifindex, v.rule, skb->len);
    if (v.flags & WEFT_FLAG_LOG)
        log_packet(&v, &p, ifindex, dir);
    if (v.action != WEFT_ALLOW)
        return TC_ACT_SHOT;
    fresh.origin = dir;
    fresh.digest = ep->digest[dir];
    weft_ct.update(&key, &fresh);
    *pp = p;
    return TC_ACT_OK;
}

int weft_from_wl(struct __sk_buff *skb)
{
    struct l4 p = {};
    int verdict = handle(skb, WEFT_DIR_EGRESS, &p);
    return verdict == TC_ACT_OK ? hairpin(skb, &p) : verdict;
}

int weft_to_wl(struct __sk_buff *skb)
{
    struct l4 p = {};
    int verdict = handle(skb, WEFT_DIR_INGRESS, &p);
    return verdict == TC_ACT_OK ? from_service(skb) : verdict;
}

/* --- Node ports: the programs on the node's uplink. -----------------------------------------
 * A connection from outside the node to one of its addresses at a node port (a weft_svcs key
 * whose address is the node's) is sent to one of the service's backends before routing (tc
 * ingress of the uplink). A backend here: its pod's own program judges the connection with the
 * client's address, and tracks it; its replies get the node address and port back as they leave
 * by the uplink (tc egress). A backend on another node (externalTrafficPolicy Cluster): the
 * connection leaves by an uplink again, and there its source becomes the node address the client
 * used (SNAT, so that the backend's replies come back through this node), on the client's port
 * if that is free towards the backend, else on one of a few random ones (none free: dropped);
 * a reply coming back gets the client as its destination on the way in (before routing: a local
 * address as its source would be a martian there) and the node port as its source on the way
 * out. Anything else passes untouched: these programs police nothing. */
#define WEFT_NAT_SNAT 2             /* weft_nat value `pad`: a node port's SNAT entry */
/* On a packet this program translated: weft-FORWARD accepts it (renderers.bpf_policy NODEPORT_MARK),
 * so a backend on another node is reached (uplink to uplink) on a node whose FORWARD policy is DROP. */
#define WEFT_MARK_NODEPORT 0x40000

int weft_from_up(struct __sk_buff *skb)
{
    struct l4 p = {};
    __u32 inner = 0;
    if (parse(skb, &p, &inner) != 0 || (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP))
        return TC_ACT_OK;
    struct weft_nat_key bk = {.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport, .dport = p.dport,
                              .proto = p.proto};
    struct weft_nat *back = weft_nat.lookup(&bk);
    if (back && back->pad == WEFT_NAT_SNAT) {
        back->seen = bpf_ktime_get_ns();
        if (rewrite(skb, &p, 1, back->addr, back->port) < 0)
            return TC_ACT_SHOT;
        skb->mark |= WEFT_MARK_NODEPORT;
        return TC_ACT_OK;
    }
    int direct = 0;
    int translated = to_service(skb, &p, bpf_ktime_get_ns(), &direct);
    if (translated < 0)
        return TC_ACT_SHOT;
    if (translated > 0)
        skb->mark |= WEFT_MARK_NODEPORT;
    return TC_ACT_OK;
}

static __always_inline int snat_out(struct __sk_buff *skb, struct l4 *p, __u64 now)
{
    __u32 in = skb->ingress_ifindex;
    if (in == 0 || weft_eps.lookup(&in))
        return TC_ACT_OK;           /* the host's own, or a pod's: not a connection from outside */
    struct weft_nat_key rk = {.saddr = p->daddr, .daddr = p->saddr, .sport = p->dport, .dport = p->sport,
                              .proto = p->proto};
    struct weft_nat *r = weft_nat.lookup(&rk);
    if (!r || r->pad != 0)
        return TC_ACT_OK;           /* not sent here by a node port */
    __u32 node = r->addr;
    struct weft_nat_key fk = {.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
                              .proto = p->proto};
    struct weft_nat *f = weft_nat.lookup(&fk);
    __u16 port = 0;
    if (f && f->pad == WEFT_NAT_SNAT && f->addr == node) {
        f->seen = now;
        port = f->port;
    } else {
        for (int i = 0; i < 4; i++) {
            __u16 candidate = i == 0 ? p->sport : bpf_htons(32768 + bpf_get_prandom_u32() % 28232);
            struct weft_nat_key ck = {.saddr = p->daddr, .daddr = node, .sport = p->dport, .dport = candidate,
                                      .proto = p->proto};
            struct weft_nat *taken = weft_nat.lookup(&ck);
            if (!taken || (taken->addr == p->saddr && taken->port == p->sport)) {
                port = candidate;
                break;
            }
        }
        if (port == 0)
            return TC_ACT_SHOT;
        struct weft_nat out = {.seen = now, .addr = node, .port = port, .pad = WEFT_NAT_SNAT};
        weft_nat.update(&fk, &out);
        struct weft_nat_key ck = {.saddr = p->daddr, .daddr = node, .sport = p->dport, .dport = port,
                                  .proto = p->proto};
        struct weft_nat in_back = {.seen = now, .addr = p->saddr, .port = p->sport, .pad = WEFT_NAT_SNAT};
        weft_nat.update(&ck, &in_back);
    }
    return rewrite(skb, p, 0, node, port) < 0 ? TC_ACT_SHOT : TC_ACT_OK;
}

int weft_to_up(struct __sk_buff *skb)
{
    struct l4 p = {};
    __u32 inner = 0;
    if (parse(skb, &p, &inner) != 0 || (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP))
        return TC_ACT_OK;
    __u64 now = bpf_ktime_get_ns();
    struct weft_nat_key rk = {.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport, .dport = p.dport,
                              .proto = p.proto};
    struct weft_nat *r = weft_nat.lookup(&rk);
    if (r && r->pad == 0) {         /* a backend's reply: the node port's address back as its source */
        r->seen = now;
        return rewrite(skb, &p, 0, r->addr, r->port) < 0 ? TC_ACT_SHOT : TC_ACT_OK;
    }
    return snat_out(skb, &p, now);
}
