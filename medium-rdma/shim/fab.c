/* The few libfabric calls ferry's rdma medium needs that libfabric's headers define as
 * static inline functions (calls through the ops tables of its objects). Nothing here
 * links against libfabric: its exported functions (fi_getinfo, fi_fabric, ...) come in
 * as pointers that the Rust side found with dlopen/dlsym. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>

struct ferry_fns {
    int (*getinfo)(uint32_t, const char *, const char *, uint64_t, const struct fi_info *, struct fi_info **);
    void (*freeinfo)(struct fi_info *);
    struct fi_info *(*dupinfo)(const struct fi_info *);
    int (*fabric)(struct fi_fabric_attr *, struct fid_fabric **, void *);
    const char *(*strerror)(int);
};

struct ferry_fab {
    struct ferry_fns fns;
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_cq *cq;
    struct fid_av *av;
    struct fid_ep *ep;
    int waitable;
};

/* What the Rust side needs to know of the chosen provider. */
struct ferry_fab_attr {
    char provider[64];
    char fabric[128];
    char domain[128];
    uint64_t mr_mode;
    uint64_t mode;
    uint64_t cq_data_size;
    uint64_t max_msg_size;
    int waitable;
};

struct ferry_cq_entry {
    uint64_t context;
    uint64_t flags;
    uint64_t len;
    uint64_t data;
};

#define FERRY_API __attribute__((visibility("hidden")))

static void say(char *err, size_t len, const struct ferry_fns *f, const char *what, int rc) {
    snprintf(err, len, "%s: %s", what, f->strerror ? f->strerror(rc < 0 ? -rc : rc) : "error");
}

static struct fi_info *hints_for(const struct ferry_fns *f, const char *prov) {
    struct fi_info *h = f->dupinfo(NULL);
    if (!h) return NULL;
    h->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_MSG | FI_SEND | FI_RECV;
    h->mode = FI_RX_CQ_DATA;
    h->ep_attr->type = FI_EP_RDM;
    h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
    h->domain_attr->threading = FI_THREAD_SAFE;
    if (prov && *prov) h->fabric_attr->prov_name = strdup(prov);
    return h;
}

static int same_host_only(const char *prov) {
    return strncmp(prov, "shm", 3) == 0 || strncmp(prov, "sm2", 3) == 0;
}

/* Lists, one a line into `out`, the providers fi_getinfo offers with RDM endpoints and
 * RMA (FI_REMOTE_WRITE), best first, each once: "tcp;ofi_rxm fabric domain". */
FERRY_API int ferry_fab_list(const struct ferry_fns *f, const char *prov, char *out, size_t len, char *err, size_t errlen) {
    struct fi_info *h = hints_for(f, prov), *list = NULL;
    if (!h) { snprintf(err, errlen, "fi_dupinfo: out of memory"); return -1; }
    int rc = f->getinfo(FI_VERSION(1, 9), NULL, NULL, 0, h, &list);
    f->freeinfo(h);
    if (rc) { say(err, errlen, f, "fi_getinfo", rc); return rc < 0 ? rc : -rc; }
    size_t used = 0;
    out[0] = 0;
    for (struct fi_info *i = list; i; i = i->next) {
        const char *p = i->fabric_attr->prov_name;
        if (!(i->caps & FI_REMOTE_WRITE) || same_host_only(p)) continue;
        int n = snprintf(out + used, len - used, "%s %s %s\n", p, i->fabric_attr->name ? i->fabric_attr->name : "?",
                         i->domain_attr->name ? i->domain_attr->name : "?");
        if (n < 0 || (size_t)n >= len - used) break;
        used += n;
    }
    f->freeinfo(list);
    return 0;
}

FERRY_API void ferry_fab_close(struct ferry_fab *fab) {
    if (!fab) return;
    if (fab->ep) fi_close(&fab->ep->fid);
    if (fab->av) fi_close(&fab->av->fid);
    if (fab->cq) fi_close(&fab->cq->fid);
    if (fab->domain) fi_close(&fab->domain->fid);
    if (fab->fabric) fi_close(&fab->fabric->fid);
    if (fab->info) fab->fns.freeinfo(fab->info);
    free(fab);
}

/* Opens provider `prov` (NULL: the first with RMA that is not same-host only), with
 * its endpoint bound to the local address `node` (NULL: the provider's choice). */
FERRY_API struct ferry_fab *ferry_fab_open(const struct ferry_fns *f, const char *prov, const char *node,
                                           struct ferry_fab_attr *attr, char *err, size_t errlen) {
    struct ferry_fab *fab = calloc(1, sizeof *fab);
    if (!fab) { snprintf(err, errlen, "out of memory"); return NULL; }
    fab->fns = *f;
    struct fi_info *h = hints_for(f, prov), *list = NULL;
    if (!h) { snprintf(err, errlen, "fi_dupinfo: out of memory"); free(fab); return NULL; }
    int rc = f->getinfo(FI_VERSION(1, 9), node, node ? "0" : NULL, node ? FI_SOURCE : 0, h, &list);
    f->freeinfo(h);
    if (rc) { say(err, errlen, f, "fi_getinfo", rc); free(fab); return NULL; }
    struct fi_info *pick = NULL;
    for (struct fi_info *i = list; i && !pick; i = i->next)
        if ((i->caps & FI_REMOTE_WRITE) && !same_host_only(i->fabric_attr->prov_name)) pick = i;
    if (!pick) { snprintf(err, errlen, "no provider with RMA between hosts"); f->freeinfo(list); free(fab); return NULL; }
    fab->info = f->dupinfo(pick);
    f->freeinfo(list);
    if (!fab->info) { snprintf(err, errlen, "fi_dupinfo: out of memory"); free(fab); return NULL; }
    struct fi_info *i = fab->info;
    if ((rc = f->fabric(i->fabric_attr, &fab->fabric, NULL))) { say(err, errlen, f, "fi_fabric", rc); goto fail; }
    if ((rc = fi_domain(fab->fabric, i, &fab->domain, NULL))) { say(err, errlen, f, "fi_domain", rc); goto fail; }
    struct fi_cq_attr cq = { .size = 1024, .format = FI_CQ_FORMAT_DATA, .wait_obj = FI_WAIT_UNSPEC };
    fab->waitable = 1;
    if (fi_cq_open(fab->domain, &cq, &fab->cq, NULL)) {
        cq.wait_obj = FI_WAIT_NONE;
        fab->waitable = 0;
        if ((rc = fi_cq_open(fab->domain, &cq, &fab->cq, NULL))) { say(err, errlen, f, "fi_cq_open", rc); goto fail; }
    }
    struct fi_av_attr av = { .type = FI_AV_TABLE, .count = 4 };
    if ((rc = fi_av_open(fab->domain, &av, &fab->av, NULL))) { say(err, errlen, f, "fi_av_open", rc); goto fail; }
    if ((rc = fi_endpoint(fab->domain, i, &fab->ep, NULL))) { say(err, errlen, f, "fi_endpoint", rc); goto fail; }
    if ((rc = fi_ep_bind(fab->ep, &fab->cq->fid, FI_TRANSMIT | FI_RECV))) { say(err, errlen, f, "fi_ep_bind(cq)", rc); goto fail; }
    if ((rc = fi_ep_bind(fab->ep, &fab->av->fid, 0))) { say(err, errlen, f, "fi_ep_bind(av)", rc); goto fail; }
    if ((rc = fi_enable(fab->ep))) { say(err, errlen, f, "fi_enable", rc); goto fail; }
    memset(attr, 0, sizeof *attr);
    snprintf(attr->provider, sizeof attr->provider, "%s", i->fabric_attr->prov_name);
    snprintf(attr->fabric, sizeof attr->fabric, "%s", i->fabric_attr->name ? i->fabric_attr->name : "?");
    snprintf(attr->domain, sizeof attr->domain, "%s", i->domain_attr->name ? i->domain_attr->name : "?");
    attr->mr_mode = i->domain_attr->mr_mode;
    attr->mode = i->mode;
    attr->cq_data_size = i->domain_attr->cq_data_size;
    attr->max_msg_size = i->ep_attr->max_msg_size;
    attr->waitable = fab->waitable;
    return fab;
fail:
    ferry_fab_close(fab);
    return NULL;
}

FERRY_API int ferry_fab_getname(struct ferry_fab *fab, void *buf, size_t *len) {
    return fi_getname(&fab->ep->fid, buf, len);
}

FERRY_API int ferry_fab_av_insert(struct ferry_fab *fab, const void *addr, uint64_t *out) {
    fi_addr_t a = FI_ADDR_UNSPEC;
    int n = fi_av_insert(fab->av, addr, 1, &a, 0, NULL);
    *out = a;
    return n == 1 ? 0 : (n < 0 ? n : -FI_EINVAL);
}

/* Registers `len` bytes at `buf` for `access` (FI_WRITE / FI_REMOTE_WRITE / ...). */
FERRY_API int ferry_fab_mr_reg(struct ferry_fab *fab, void *buf, size_t len, uint64_t access, uint64_t requested_key,
                               void **mr, uint64_t *key, void **desc) {
    struct fid_mr *m = NULL;
    int rc = fi_mr_reg(fab->domain, buf, len, access, 0, requested_key, 0, &m, NULL);
    if (rc) return rc;
    *mr = m;
    *key = fi_mr_key(m);
    *desc = fi_mr_desc(m);
    return 0;
}

FERRY_API void ferry_fab_mr_close(void *mr) {
    if (mr) fi_close(&((struct fid_mr *)mr)->fid);
}

FERRY_API ssize_t ferry_fab_writedata(struct ferry_fab *fab, const void *buf, size_t len, void *desc, uint64_t data,
                                      uint64_t dest, uint64_t addr, uint64_t key, void *context) {
    return fi_writedata(fab->ep, buf, len, desc, data, (fi_addr_t)dest, addr, key, context);
}

FERRY_API ssize_t ferry_fab_recv(struct ferry_fab *fab, void *buf, size_t len, void *desc, void *context) {
    return fi_recv(fab->ep, buf, len, desc, FI_ADDR_UNSPEC, context);
}

/* Up to `count` completions; waits up to `timeout_ms` for the first when the CQ has a
 * wait object. 0 when none came, a negative fi_errno on error (-FI_EAVAIL: an error
 * completion, read it with ferry_fab_cq_err). */
FERRY_API ssize_t ferry_fab_cq_read(struct ferry_fab *fab, struct ferry_cq_entry *out, size_t count, int timeout_ms) {
    struct fi_cq_data_entry e[16];
    if (count > 16) count = 16;
    ssize_t n = fab->waitable && timeout_ms > 0 ? fi_cq_sread(fab->cq, e, count, NULL, timeout_ms)
                                                : fi_cq_read(fab->cq, e, count);
    if (n == -FI_EAGAIN) return 0;
    if (n < 0) return n;
    for (ssize_t k = 0; k < n; k++) {
        out[k].context = (uint64_t)(uintptr_t)e[k].op_context;
        out[k].flags = e[k].flags;
        out[k].len = e[k].len;
        out[k].data = e[k].data;
    }
    return n;
}

FERRY_API int ferry_fab_cq_err(struct ferry_fab *fab, uint64_t *context, char *msg, size_t len) {
    struct fi_cq_err_entry e;
    memset(&e, 0, sizeof e);
    ssize_t n = fi_cq_readerr(fab->cq, &e, 0);
    if (n < 0) { snprintf(msg, len, "fi_cq_readerr: %s", fab->fns.strerror((int)-n)); *context = 0; return (int)n; }
    *context = (uint64_t)(uintptr_t)e.op_context;
    snprintf(msg, len, "%s (%s)", fab->fns.strerror(e.err), fi_cq_strerror(fab->cq, e.prov_errno, e.err_data, NULL, 0));
    return e.err;
}
