/* weft's eBPF maps: the layout shared by the programs (policy.c) and by weft's Python side
 * (weft.model.bpf packs and unpacks exactly these structs; a test compares the sizes).
 *
 * The digest of this file names the directory the maps are pinned in, so a change of layout
 * gets new maps (written in full by the next apply) while a change of program logic keeps the
 * maps, their policy and their tracked connections.
 *
 * WEFT_MAPS (a string literal) is the pin directory, given by the loader as a -D flag.
 */
#ifndef WEFT_MAPS_H
#define WEFT_MAPS_H

#define WEFT_DIR_EGRESS 0           /* from the workload: tc ingress of its host-side veth */
#define WEFT_DIR_INGRESS 1          /* to the workload: tc egress of its host-side veth */
#define WEFT_ORIGIN_HOST 2          /* a connection the host opened to the workload (never policed) */

#define WEFT_PROFILE_OPEN 0         /* no policy selects the endpoint for the direction */
#define WEFT_PROFILE_CLOSED 1       /* a pod the desired state does not show yet, some policy might select */

#define WEFT_ALLOW 1
#define WEFT_DENY 2
#define WEFT_DPORTS 3               /* decided by the destination port: look `arg` up in weft_ports */
#define WEFT_SPORTS 4               /* decided by the source port: look `arg` up in weft_ports */

#define WEFT_FLAG_LOG 1             /* Log rules matched on the way: `arg` is their log id */

/* One workload interface (key: its ifindex). [direction][0 = source, 1 = destination]. */
struct weft_ep {
    __u32 profile[2];
    __u32 classifier[2][2];
    __u32 digest[2];                /* changes whenever the direction's verdicts change */
};

/* An address classifier entry: (classifier, address/prefix) -> class. Prefixes always cover the
 * whole classifier id, so its byte order does not matter; the address is in network order. */
struct weft_cls_key {
    __u32 prefixlen;                /* 32 + the address prefix length */
    __u32 classifier;
    __u32 addr;
};

struct weft_verdict_key {
    __u32 profile;
    __u32 src_class;
    __u32 dst_class;
    __u8 proto;
    __u8 any_proto;                 /* 1: the entry for every protocol without an entry of its own */
    __u16 pad;
};

struct weft_verdict {
    __u8 action;                    /* WEFT_ALLOW, WEFT_DENY, WEFT_DPORTS, WEFT_SPORTS */
    __u8 flags;                     /* WEFT_FLAG_LOG */
    __u16 pad;
    __u32 rule;                     /* the rule that decided (counters, `weft bpf policy`) */
    __u32 arg;                      /* port table (DPORTS/SPORTS) or log id (LOG) */
};

/* A port table entry: (table, port/prefix) -> verdict; the port in network order, so prefixes
 * are its high bits. For ICMP the "destination port" is type << 8 | code. */
struct weft_port_key {
    __u32 prefixlen;                /* 32 + the port prefix length */
    __u32 table;
    __u16 port;
} __attribute__((packed));

/* weft's own connection tracking, per workload interface: (a, b) is the ordered address/port
 * pair, so both directions of a connection find the same entry. */
struct weft_ct_key {
    __u32 ifindex;
    __u32 addr_a;
    __u32 addr_b;
    __u16 port_a;
    __u16 port_b;
    __u8 proto;
    __u8 pad[3];
};

struct weft_ct {
    __u64 seen;                     /* bpf_ktime_get_ns() of the last packet */
    __u32 digest;                   /* the origin direction's digest when last judged */
    __u16 pol_sport;                /* the opening packet's ports as policy sees them */
    __u16 pol_dport;
    __u8 origin;                    /* WEFT_DIR_* or WEFT_ORIGIN_HOST */
    __u8 origin_is_a;
    __u8 flags;                     /* WEFT_CT_* */
    __u8 pad;
    __u32 reserved;                 /* explicit: the struct is 8-byte aligned */
};

#define WEFT_CT_FIN_A 1
#define WEFT_CT_FIN_B 2
#define WEFT_CT_RST 4

struct weft_count_key {
    __u32 ifindex;                  /* the endpoint's interface */
    __u32 rule;                     /* the deciding rule */
};

struct weft_count {
    __u64 packets;
    __u64 bytes;
};

struct weft_log_event {
    __u32 log_id;
    __u32 ifindex;
    __u32 saddr;
    __u32 daddr;
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 direction;
    __u8 action;
    __u8 pad;
};

BPF_TABLE_PINNED("hash", __u32, struct weft_ep, weft_eps, 65536, WEFT_MAPS "/endpoints", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct weft_cls_key, __u32, weft_cls, 1048576, WEFT_MAPS "/classifiers",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct weft_verdict_key, struct weft_verdict, weft_verdicts, 1048576,
                 WEFT_MAPS "/verdicts", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct weft_port_key, struct weft_verdict, weft_ports, 262144,
                 WEFT_MAPS "/ports", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct weft_ct_key, struct weft_ct, weft_ct, 65536, WEFT_MAPS "/conntrack");
BPF_TABLE_PINNED("percpu_hash", struct weft_count_key, struct weft_count, weft_counters, 65536, WEFT_MAPS "/counters",
                 BPF_F_NO_PREALLOC);

/* Log events (bcc's BPF_RINGBUF_OUTPUT, pinned). */
struct weft_log_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output) (void *, u64, u64);
    void* (*ringbuf_reserve) (u64);
    void (*ringbuf_discard) (void *, u64);
    void (*ringbuf_submit) (void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/ringbuf:" WEFT_MAPS "/log")))
struct weft_log_table_t weft_log = { .max_entries = 64 * 4096 };

#endif
