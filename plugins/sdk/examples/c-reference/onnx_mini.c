/* See onnx_mini.h. The protobuf wire format is read directly: every length
 * is checked against the bytes that remain, so a truncated or hostile file
 * fails with a message and never reads out of bounds. Field numbers are
 * those of onnx/onnx.proto (IR version 3 and later). */
#define _POSIX_C_SOURCE 200809L
#include "onnx_mini.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds that keep every size computation far from overflow. */
#define OM_MAX_FILE_BYTES ((uint64_t)1 << 31) /* protobuf's own 2 GiB limit */
#define OM_MAX_ELEMENTS ((uint64_t)1 << 32)
#define OM_MAX_NODE_INPUTS 8
#define OM_MAX_ATTR_INTS (2 * OM_MAX_RANK)

void om_errorf(char *err, size_t err_cap, const char *fmt, ...) {
    if (err == NULL || err_cap == 0) {
        return;
    }
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t len = n < 0 ? 0 : (size_t)n;
    if (len >= sizeof msg) {
        len = sizeof msg - 1;
    }
    if (len > err_cap - 1) {
        len = err_cap - 1;
    }
    /* Never end inside a multi-byte character: if the first byte left out
     * continues a character, drop that character whole. */
    while (len > 0 && len < strlen(msg) && ((unsigned char)msg[len] & 0xC0) == 0x80) {
        len--;
    }
    memcpy(err, msg, len);
    err[len] = '\0';
}

/* ------------------------------------------------------------------------
 * Protobuf wire format
 * ---------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} pb;

enum { WIRE_VARINT = 0, WIRE_I64 = 1, WIRE_LEN = 2, WIRE_I32 = 5 };

static int pb_varint(pb *r, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) {
            return 0;
        }
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 1;
        }
    }
    return 0;
}

static int pb_key(pb *r, uint32_t *field, uint32_t *wire) {
    uint64_t k;
    if (!pb_varint(r, &k) || (k >> 3) == 0 || (k >> 3) > UINT32_MAX) {
        return 0;
    }
    *field = (uint32_t)(k >> 3);
    *wire = (uint32_t)(k & 7);
    return 1;
}

static int pb_sub(pb *r, pb *sub) {
    uint64_t n;
    if (!pb_varint(r, &n) || n > (uint64_t)(r->end - r->p)) {
        return 0;
    }
    sub->p = r->p;
    sub->end = r->p + n;
    r->p += n;
    return 1;
}

static int pb_fixed32(pb *r, uint32_t *v) {
    if (r->end - r->p < 4) {
        return 0;
    }
    *v = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 |
         (uint32_t)r->p[3] << 24;
    r->p += 4;
    return 1;
}

static int pb_skip(pb *r, uint32_t wire) {
    uint64_t v;
    pb sub;
    switch (wire) {
    case WIRE_VARINT:
        return pb_varint(r, &v);
    case WIRE_I64:
        if (r->end - r->p < 8) {
            return 0;
        }
        r->p += 8;
        return 1;
    case WIRE_LEN:
        return pb_sub(r, &sub);
    case WIRE_I32:
        if (r->end - r->p < 4) {
            return 0;
        }
        r->p += 4;
        return 1;
    default: /* groups (3, 4) are not used by ONNX */
        return 0;
    }
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A NUL-terminated copy of a length-delimited field. */
static char *pb_string(pb *r) {
    pb s;
    if (!pb_sub(r, &s)) {
        return NULL;
    }
    size_t n = (size_t)(s.end - s.p);
    char *out = malloc(n + 1);
    if (out != NULL) {
        memcpy(out, s.p, n);
        out[n] = '\0';
    }
    return out;
}

/* Reads one value of a repeated int64 field, packed (wire 2: appends all)
 * or not (wire 0: appends one). */
static int pb_ints(pb *r, uint32_t wire, int64_t *vals, int *count, int cap) {
    uint64_t v;
    if (wire == WIRE_VARINT) {
        if (!pb_varint(r, &v) || *count >= cap) {
            return 0;
        }
        vals[(*count)++] = (int64_t)v;
        return 1;
    }
    pb s;
    if (wire != WIRE_LEN || !pb_sub(r, &s)) {
        return 0;
    }
    while (s.p < s.end) {
        if (!pb_varint(&s, &v) || *count >= cap) {
            return 0;
        }
        vals[(*count)++] = (int64_t)v;
    }
    return 1;
}

/* ------------------------------------------------------------------------
 * Model
 * ---------------------------------------------------------------------- */

typedef struct {
    int rank;
    int64_t dims[OM_MAX_RANK];
    size_t len;
    float *data; /* owned by whoever holds the tensor */
} tensor;

typedef enum { OP_CONV, OP_RELU, OP_SIGMOID, OP_ADD, OP_SUB, OP_MUL, OP_IDENTITY, OP_CONSTANT } op_kind;

typedef struct {
    op_kind op;
    char *name;
    int n_in;
    int in[3]; /* value ids; -1 for an omitted optional input */
    int out;
    /* Conv */
    int spatial;
    int64_t strides[OM_MAX_RANK], dilations[OM_MAX_RANK], pads[2 * OM_MAX_RANK];
    int64_t group;
    /* Constant */
    tensor constant;
} node;

typedef enum { V_INPUT, V_INIT, V_NODE } value_kind;

typedef struct {
    char *name;
    value_kind kind;
    int index;    /* initializer index or producing node */
    int last_use; /* last node reading it; n_nodes for the graph output */
} value;

struct om_model {
    char *path;
    om_value_info input, output;
    char input_desc[256]; /* e.g. "image [N, 1, 16, 16, 16]", for messages */
    int input_id, output_id;
    value *values;
    int n_values, cap_values;
    node *nodes;
    int n_nodes, cap_nodes;
    tensor *inits;
    int n_inits, cap_inits;
};

static int grow(void **arr, int *cap, int need, size_t elem) {
    if (need <= *cap) {
        return 1;
    }
    int n = *cap ? *cap * 2 : 16;
    while (n < need) {
        n *= 2;
    }
    void *p = realloc(*arr, (size_t)n * elem);
    if (p == NULL) {
        return 0;
    }
    memset((char *)p + (size_t)*cap * elem, 0, (size_t)(n - *cap) * elem);
    *arr = p;
    *cap = n;
    return 1;
}

static int find_value(const om_model *m, const char *name) {
    for (int i = 0; i < m->n_values; i++) {
        if (strcmp(m->values[i].name, name) == 0) {
            return i;
        }
    }
    return -1;
}

/* Adds a value, taking ownership of `name`; -1 if out of memory. */
static int add_value(om_model *m, char *name, value_kind kind, int index) {
    if (!grow((void **)&m->values, &m->cap_values, m->n_values + 1, sizeof(value))) {
        free(name);
        return -1;
    }
    value *v = &m->values[m->n_values];
    v->name = name;
    v->kind = kind;
    v->index = index;
    v->last_use = -1;
    return m->n_values++;
}

static int elements(const int64_t *dims, int rank, size_t *out) {
    uint64_t n = 1;
    for (int i = 0; i < rank; i++) {
        if (dims[i] < 0 || (dims[i] > 0 && n > OM_MAX_ELEMENTS / (uint64_t)dims[i])) {
            return 0;
        }
        n *= (uint64_t)dims[i];
    }
    *out = (size_t)n;
    return 1;
}

/* TensorProto -> f32 tensor (FLOAT only, data inline). */
static int parse_tensor(pb r, tensor *t, char **name, char *err, size_t cap) {
    int64_t dims[OM_MAX_RANK];
    int rank = 0;
    uint64_t data_type = 0, location = 0;
    pb raw = {NULL, NULL}, floats = {NULL, NULL};
    int raw_seen = 0, n_unpacked = 0;
    const uint8_t *unpacked_first = NULL;
    uint32_t field, wire;
    while (r.p < r.end) {
        const uint8_t *at = r.p;
        if (!pb_key(&r, &field, &wire)) {
            goto malformed;
        }
        if (field == 1) {
            if (!pb_ints(&r, wire, dims, &rank, OM_MAX_RANK)) {
                om_errorf(err, cap, "a tensor has more than %d dimensions or bad dims",
                          OM_MAX_RANK);
                return 0;
            }
        } else if (field == 2 && wire == WIRE_VARINT) {
            if (!pb_varint(&r, &data_type)) {
                goto malformed;
            }
        } else if (field == 4 && wire == WIRE_LEN) {
            if (!pb_sub(&r, &floats)) {
                goto malformed;
            }
        } else if (field == 4 && wire == WIRE_I32) {
            /* Unpacked float_data: consecutive fixed32 records. */
            if (unpacked_first == NULL) {
                unpacked_first = at;
            }
            uint32_t u = 0;
            if (!pb_fixed32(&r, &u)) {
                goto malformed;
            }
            n_unpacked++;
        } else if (field == 8 && wire == WIRE_LEN && name != NULL) {
            free(*name);
            if ((*name = pb_string(&r)) == NULL) {
                goto malformed;
            }
        } else if (field == 9 && wire == WIRE_LEN) {
            if (!pb_sub(&r, &raw)) {
                goto malformed;
            }
            raw_seen = 1;
        } else if (field == 14 && wire == WIRE_VARINT) {
            if (!pb_varint(&r, &location)) {
                goto malformed;
            }
        } else if (!pb_skip(&r, wire)) {
            goto malformed;
        }
    }
    const char *tname = (name != NULL && *name != NULL) ? *name : "(unnamed)";
    if (location == 1) {
        om_errorf(err, cap, "tensor `%s` keeps its data in an external file; c-reference reads "
                  "only self-contained models", tname);
        return 0;
    }
    if (data_type != 1) {
        om_errorf(err, cap, "tensor `%s` has ONNX data type %llu; c-reference runs float32 "
                  "(type 1) models only", tname, (unsigned long long)data_type);
        return 0;
    }
    size_t len;
    if (!elements(dims, rank, &len)) {
        om_errorf(err, cap, "tensor `%s` has negative or too large dimensions", tname);
        return 0;
    }
    t->rank = rank;
    memcpy(t->dims, dims, sizeof(int64_t) * (size_t)rank);
    t->len = len;
    t->data = malloc(len ? len * sizeof(float) : 1);
    if (t->data == NULL) {
        om_errorf(err, cap, "out of memory reading tensor `%s`", tname);
        return 0;
    }
    if (raw_seen) {
        if ((size_t)(raw.end - raw.p) != len * 4) {
            om_errorf(err, cap, "tensor `%s`: raw_data holds %zu bytes, its shape needs %zu",
                      tname, (size_t)(raw.end - raw.p), len * 4);
            goto fail;
        }
        for (size_t i = 0; i < len; i++) {
            uint32_t u = 0;
            pb_fixed32(&raw, &u);
            t->data[i] = f32_from_bits(u);
        }
    } else if (floats.p != NULL) {
        if ((size_t)(floats.end - floats.p) != len * 4) {
            om_errorf(err, cap, "tensor `%s`: float_data holds %zu values, its shape needs %zu",
                      tname, (size_t)(floats.end - floats.p) / 4, len);
            goto fail;
        }
        for (size_t i = 0; i < len; i++) {
            uint32_t u = 0;
            pb_fixed32(&floats, &u);
            t->data[i] = f32_from_bits(u);
        }
    } else if (n_unpacked > 0) {
        if ((size_t)n_unpacked != len) {
            om_errorf(err, cap, "tensor `%s`: float_data holds %d values, its shape needs %zu",
                      tname, n_unpacked, len);
            goto fail;
        }
        /* The records were validated above; read them again in order,
         * skipping any other field between them. */
        pb again = {unpacked_first, r.end};
        size_t i = 0;
        while (i < len && again.p < again.end) {
            pb_key(&again, &field, &wire);
            uint32_t u = 0;
            if (field == 4 && wire == WIRE_I32) {
                pb_fixed32(&again, &u);
                t->data[i++] = f32_from_bits(u);
            } else {
                pb_skip(&again, wire);
            }
        }
    } else if (len != 0) {
        om_errorf(err, cap, "tensor `%s` holds no data", tname);
        goto fail;
    }
    return 1;
malformed:
    om_errorf(err, cap, "malformed TensorProto");
    return 0;
fail:
    free(t->data);
    t->data = NULL;
    return 0;
}

/* ValueInfoProto -> name and shape. */
static int parse_value_info(pb r, om_value_info *vi, char *err, size_t cap) {
    uint32_t field, wire;
    int typed = 0;
    while (r.p < r.end) {
        if (!pb_key(&r, &field, &wire)) {
            goto malformed;
        }
        if (field == 1 && wire == WIRE_LEN) {
            free(vi->name);
            if ((vi->name = pb_string(&r)) == NULL) {
                goto malformed;
            }
        } else if (field == 2 && wire == WIRE_LEN) {
            pb type, tt;
            if (!pb_sub(&r, &type)) {
                goto malformed;
            }
            while (type.p < type.end) {
                if (!pb_key(&type, &field, &wire)) {
                    goto malformed;
                }
                if (field != 1 || wire != WIRE_LEN) {
                    if (!pb_skip(&type, wire)) {
                        goto malformed;
                    }
                    continue;
                }
                if (!pb_sub(&type, &tt)) {
                    goto malformed;
                }
                /* TypeProto.Tensor */
                typed = 1;
                while (tt.p < tt.end) {
                    if (!pb_key(&tt, &field, &wire)) {
                        goto malformed;
                    }
                    uint64_t elem;
                    if (field == 1 && wire == WIRE_VARINT) {
                        if (!pb_varint(&tt, &elem)) {
                            goto malformed;
                        }
                        if (elem != 1) {
                            om_errorf(err, cap, "graph value `%s` has ONNX element type %llu; "
                                      "c-reference runs float32 only",
                                      vi->name ? vi->name : "?", (unsigned long long)elem);
                            return 0;
                        }
                    } else if (field == 2 && wire == WIRE_LEN) {
                        pb shape, dim;
                        if (!pb_sub(&tt, &shape)) {
                            goto malformed;
                        }
                        vi->rank = 0;
                        while (shape.p < shape.end) {
                            if (!pb_key(&shape, &field, &wire)) {
                                goto malformed;
                            }
                            if (field != 1 || wire != WIRE_LEN) {
                                if (!pb_skip(&shape, wire)) {
                                    goto malformed;
                                }
                                continue;
                            }
                            if (!pb_sub(&shape, &dim)) {
                                goto malformed;
                            }
                            if (vi->rank >= OM_MAX_RANK) {
                                om_errorf(err, cap, "graph value `%s` has more than %d dimensions",
                                          vi->name ? vi->name : "?", OM_MAX_RANK);
                                return 0;
                            }
                            int64_t d = OM_DIM_UNKNOWN;
                            while (dim.p < dim.end) {
                                uint64_t v;
                                if (!pb_key(&dim, &field, &wire)) {
                                    goto malformed;
                                }
                                if (field == 1 && wire == WIRE_VARINT) {
                                    if (!pb_varint(&dim, &v)) {
                                        goto malformed;
                                    }
                                    d = (int64_t)v < 0 ? OM_DIM_UNKNOWN : (int64_t)v;
                                } else if (!pb_skip(&dim, wire)) {
                                    goto malformed;
                                }
                            }
                            vi->dims[vi->rank++] = d;
                        }
                    } else if (!pb_skip(&tt, wire)) {
                        goto malformed;
                    }
                }
            }
        } else if (!pb_skip(&r, wire)) {
            goto malformed;
        }
    }
    if (vi->name == NULL) {
        om_errorf(err, cap, "a graph input or output has no name");
        return 0;
    }
    if (!typed) {
        om_errorf(err, cap, "graph value `%s` declares no tensor type; c-reference needs its rank",
                  vi->name);
        return 0;
    }
    return 1;
malformed:
    om_errorf(err, cap, "malformed ValueInfoProto");
    return 0;
}

typedef struct {
    char *name;
    uint64_t type;
    int has_f, has_i, has_t, n_ints, n_floats;
    float f;
    int64_t i;
    pb s, t;
    int64_t ints[OM_MAX_ATTR_INTS];
} attr;

static int parse_attr(pb r, attr *a) {
    uint32_t field, wire;
    memset(a, 0, sizeof *a);
    while (r.p < r.end) {
        if (!pb_key(&r, &field, &wire)) {
            return 0;
        }
        uint64_t v;
        uint32_t u = 0;
        if (field == 1 && wire == WIRE_LEN) {
            free(a->name);
            if ((a->name = pb_string(&r)) == NULL) {
                return 0;
            }
        } else if (field == 2 && wire == WIRE_I32) {
            if (!pb_fixed32(&r, &u)) {
                return 0;
            }
            a->f = f32_from_bits(u);
            a->has_f = 1;
        } else if (field == 3 && wire == WIRE_VARINT) {
            if (!pb_varint(&r, &v)) {
                return 0;
            }
            a->i = (int64_t)v;
            a->has_i = 1;
        } else if (field == 4 && wire == WIRE_LEN) {
            if (!pb_sub(&r, &a->s)) {
                return 0;
            }
        } else if (field == 5 && wire == WIRE_LEN) {
            if (!pb_sub(&r, &a->t)) {
                return 0;
            }
            a->has_t = 1;
        } else if (field == 7) {
            /* floats: only counted (Constant value_floats is not supported) */
            a->n_floats++;
            if (!pb_skip(&r, wire)) {
                return 0;
            }
        } else if (field == 8) {
            if (!pb_ints(&r, wire, a->ints, &a->n_ints, OM_MAX_ATTR_INTS)) {
                return 0;
            }
        } else if (field == 20 && wire == WIRE_VARINT) {
            if (!pb_varint(&r, &a->type)) {
                return 0;
            }
        } else if (!pb_skip(&r, wire)) {
            return 0;
        }
    }
    return a->name != NULL;
}

static int pb_equals(pb s, const char *lit) {
    size_t n = strlen(lit);
    return (size_t)(s.end - s.p) == n && memcmp(s.p, lit, n) == 0;
}

static const tensor *static_tensor(const om_model *m, int id) {
    if (id < 0) {
        return NULL;
    }
    const value *v = &m->values[id];
    if (v->kind == V_INIT) {
        return &m->inits[v->index];
    }
    if (v->kind == V_NODE && m->nodes[v->index].op == OP_CONSTANT) {
        return &m->nodes[v->index].constant;
    }
    return NULL;
}

static const struct {
    const char *name;
    op_kind op;
    int min_in, max_in;
} OPS[] = {
    {"Conv", OP_CONV, 2, 3},       {"Relu", OP_RELU, 1, 1}, {"Sigmoid", OP_SIGMOID, 1, 1},
    {"Add", OP_ADD, 2, 2},         {"Sub", OP_SUB, 2, 2},   {"Mul", OP_MUL, 2, 2},
    {"Identity", OP_IDENTITY, 1, 1}, {"Constant", OP_CONSTANT, 0, 0},
};

#define SUPPORTED_OPS "Conv, Relu, Sigmoid, Add, Sub, Mul, Identity, Constant"

/* Checks a Conv node's attributes against its (constant) weight and fills
 * strides, dilations and pads with their defaults. */
static int setup_conv(om_model *m, node *n, attr *attrs, int n_attrs, char *err, size_t cap) {
    const tensor *w = static_tensor(m, n->in[1]);
    if (w == NULL) {
        om_errorf(err, cap, "Conv `%s`: the weight must be an initializer or a Constant", n->name);
        return 0;
    }
    if (w->rank < 3) {
        om_errorf(err, cap, "Conv `%s`: weight rank %d; need at least 3", n->name, w->rank);
        return 0;
    }
    int k = w->rank - 2;
    n->spatial = k;
    n->group = 1;
    for (int i = 0; i < k; i++) {
        n->strides[i] = 1;
        n->dilations[i] = 1;
        n->pads[i] = n->pads[k + i] = 0;
    }
    for (int j = 0; j < n_attrs; j++) {
        attr *a = &attrs[j];
        int64_t *dst = NULL;
        int want = k;
        if (strcmp(a->name, "kernel_shape") == 0) {
            if (a->n_ints != k || memcmp(a->ints, w->dims + 2, sizeof(int64_t) * (size_t)k) != 0) {
                om_errorf(err, cap, "Conv `%s`: kernel_shape disagrees with the weight's shape",
                          n->name);
                return 0;
            }
            continue;
        } else if (strcmp(a->name, "strides") == 0) {
            dst = n->strides;
        } else if (strcmp(a->name, "dilations") == 0) {
            dst = n->dilations;
        } else if (strcmp(a->name, "pads") == 0) {
            dst = n->pads;
            want = 2 * k;
        } else if (strcmp(a->name, "group") == 0 && a->has_i) {
            n->group = a->i;
            continue;
        } else if (strcmp(a->name, "auto_pad") == 0) {
            if (pb_equals(a->s, "NOTSET") || pb_equals(a->s, "VALID")) {
                continue;
            }
            om_errorf(err, cap, "Conv `%s`: auto_pad SAME_* is not supported; export with "
                      "explicit pads", n->name);
            return 0;
        } else {
            om_errorf(err, cap, "Conv `%s`: unsupported attribute `%s`", n->name, a->name);
            return 0;
        }
        if (a->n_ints != want) {
            om_errorf(err, cap, "Conv `%s`: `%s` has %d values; need %d", n->name, a->name,
                      a->n_ints, want);
            return 0;
        }
        for (int i = 0; i < want; i++) {
            int bad = dst == n->pads ? (a->ints[i] < 0 || a->ints[i] > 1 << 20)
                                     : (a->ints[i] < 1 || a->ints[i] > 1 << 20);
            if (bad) {
                om_errorf(err, cap, "Conv `%s`: `%s` value %lld out of range", n->name, a->name,
                          (long long)a->ints[i]);
                return 0;
            }
            dst[i] = a->ints[i];
        }
    }
    if (n->group < 1 || w->dims[0] % n->group != 0) {
        om_errorf(err, cap, "Conv `%s`: group %lld does not divide the %lld output channels",
                  n->name, (long long)n->group, (long long)w->dims[0]);
        return 0;
    }
    if (n->n_in == 3 && n->in[2] >= 0) {
        const tensor *b = static_tensor(m, n->in[2]);
        if (b == NULL || b->rank != 1 || b->dims[0] != w->dims[0]) {
            om_errorf(err, cap, "Conv `%s`: the bias must be a constant of %lld values", n->name,
                      (long long)w->dims[0]);
            return 0;
        }
    }
    return 1;
}

static void free_attrs(attr *attrs, int n) {
    for (int i = 0; i < n; i++) {
        free(attrs[i].name);
    }
}

static int parse_node(om_model *m, pb r, char *err, size_t cap) {
    char *inputs[OM_MAX_NODE_INPUTS] = {0};
    char *output = NULL, *name = NULL, *op_type = NULL, *domain = NULL;
    attr attrs[16];
    int n_inputs = 0, n_outputs = 0, n_attrs = 0, ok = 0;
    uint32_t field, wire;
    while (r.p < r.end) {
        if (!pb_key(&r, &field, &wire)) {
            goto malformed;
        }
        char **slot = NULL;
        if (field == 1 && wire == WIRE_LEN) {
            if (n_inputs >= OM_MAX_NODE_INPUTS) {
                om_errorf(err, cap, "a node has more than %d inputs", OM_MAX_NODE_INPUTS);
                goto done;
            }
            slot = &inputs[n_inputs++];
        } else if (field == 2 && wire == WIRE_LEN) {
            if (n_outputs++ > 0) {
                pb_skip(&r, wire); /* counted; refused below */
                continue;
            }
            slot = &output;
        } else if (field == 3 && wire == WIRE_LEN) {
            slot = &name;
        } else if (field == 4 && wire == WIRE_LEN) {
            slot = &op_type;
        } else if (field == 7 && wire == WIRE_LEN) {
            slot = &domain;
        } else if (field == 5 && wire == WIRE_LEN) {
            pb a;
            if (n_attrs >= 16) {
                om_errorf(err, cap, "a node has more than 16 attributes");
                goto done;
            }
            if (!pb_sub(&r, &a)) {
                goto malformed;
            }
            /* parse_attr owns attrs[n_attrs] from its first line: on failure
             * it may hold a name, and never a stale pointer. */
            if (!parse_attr(a, &attrs[n_attrs])) {
                free(attrs[n_attrs].name);
                goto malformed;
            }
            n_attrs++;
            continue;
        } else {
            if (!pb_skip(&r, wire)) {
                goto malformed;
            }
            continue;
        }
        free(*slot);
        if ((*slot = pb_string(&r)) == NULL) {
            goto malformed;
        }
    }
    const char *label = name && *name ? name : (op_type ? op_type : "?");
    if (op_type == NULL) {
        om_errorf(err, cap, "node `%s` has no op_type", label);
        goto done;
    }
    if (domain != NULL && *domain && strcmp(domain, "ai.onnx") != 0) {
        om_errorf(err, cap, "node `%s`: operator domain `%s` is not supported (only the default "
                  "ONNX domain)", label, domain);
        goto done;
    }
    int op = -1;
    for (size_t i = 0; i < sizeof OPS / sizeof OPS[0]; i++) {
        if (strcmp(OPS[i].name, op_type) == 0) {
            op = (int)i;
        }
    }
    if (op < 0) {
        om_errorf(err, cap, "operator `%s` (node `%s`) is not supported by c-reference; it runs "
                  SUPPORTED_OPS, op_type, label);
        goto done;
    }
    if (n_inputs < OPS[op].min_in || n_inputs > OPS[op].max_in || n_outputs != 1 ||
        output == NULL || *output == '\0') {
        om_errorf(err, cap, "node `%s` (%s): %d inputs and %d outputs; c-reference supports "
                  "%d to %d inputs and one output", label, op_type, n_inputs, n_outputs,
                  OPS[op].min_in, OPS[op].max_in);
        goto done;
    }
    if (!grow((void **)&m->nodes, &m->cap_nodes, m->n_nodes + 1, sizeof(node))) {
        om_errorf(err, cap, "out of memory");
        goto done;
    }
    node *n = &m->nodes[m->n_nodes];
    memset(n, 0, sizeof *n);
    n->op = OPS[op].op;
    if (name != NULL && *name != '\0') {
        n->name = name;
        name = NULL;
    } else {
        n->name = strdup(op_type);
    }
    if (n->name == NULL) {
        om_errorf(err, cap, "out of memory");
        goto done;
    }
    n->n_in = n_inputs;
    for (int i = 0; i < n_inputs; i++) {
        /* An empty name is an omitted optional input (Conv's bias). */
        if (*inputs[i] == '\0' && i == 2) {
            n->in[i] = -1;
            continue;
        }
        n->in[i] = find_value(m, inputs[i]);
        if (n->in[i] < 0) {
            om_errorf(err, cap, "node `%s` reads `%s`, which no earlier node, input or "
                      "initializer defines (the graph must be topologically sorted)",
                      n->name, inputs[i]);
            free(n->name);
            goto done;
        }
        m->values[n->in[i]].last_use = m->n_nodes;
    }
    if (find_value(m, output) >= 0) {
        om_errorf(err, cap, "node `%s` redefines `%s`", n->name, output);
        free(n->name);
        goto done;
    }
    if (n->op == OP_CONSTANT) {
        if (n_attrs != 1 || strcmp(attrs[0].name, "value") != 0 || !attrs[0].has_t) {
            om_errorf(err, cap, "Constant `%s`: only the `value` tensor attribute is supported",
                      n->name);
            free(n->name);
            goto done;
        }
        if (!parse_tensor(attrs[0].t, &n->constant, NULL, err, cap)) {
            free(n->name);
            goto done;
        }
    } else if (n->op == OP_CONV) {
        /* Counted now so setup_conv sees the node; undone on failure. */
        m->n_nodes++;
        int conv_ok = setup_conv(m, n, attrs, n_attrs, err, cap);
        m->n_nodes--;
        if (!conv_ok) {
            free(n->name);
            goto done;
        }
    } else if (n_attrs > 0) {
        om_errorf(err, cap, "node `%s` (%s): unsupported attribute `%s`", n->name, op_type,
                  attrs[0].name);
        free(n->name);
        goto done;
    }
    n->out = add_value(m, output, V_NODE, m->n_nodes);
    output = NULL;
    if (n->out < 0) {
        om_errorf(err, cap, "out of memory");
        free(n->name);
        free(n->constant.data);
        goto done;
    }
    m->n_nodes++;
    ok = 1;
    goto done;
malformed:
    om_errorf(err, cap, "malformed NodeProto");
done:
    for (int i = 0; i < n_inputs; i++) {
        free(inputs[i]);
    }
    free(output);
    free(name);
    free(op_type);
    free(domain);
    free_attrs(attrs, n_attrs);
    return ok;
}

static void describe_input(om_model *m, const char **params) {
    char *d = m->input_desc;
    size_t cap = sizeof m->input_desc, len = 0;
    len += (size_t)snprintf(d, cap, "%s [", m->input.name);
    for (int i = 0; i < m->input.rank && len < cap; i++) {
        if (m->input.dims[i] >= 0) {
            len += (size_t)snprintf(d + len, cap - len, "%s%lld", i ? ", " : "",
                                    (long long)m->input.dims[i]);
        } else {
            len += (size_t)snprintf(d + len, cap - len, "%s%s", i ? ", " : "",
                                    params[i] ? params[i] : "?");
        }
    }
    if (len < cap) {
        snprintf(d + len, cap - len, "]");
    }
}

/* The next length-delimited field `want` of a message: 1 with its bytes in
 * *sub, 0 at the end, -1 when the message is malformed. */
static int pb_next_field(pb *r, uint32_t want, pb *sub) {
    uint32_t field, wire;
    while (r->p < r->end) {
        if (!pb_key(r, &field, &wire)) {
            return -1;
        }
        if (field == want && wire == WIRE_LEN) {
            return pb_sub(r, sub) ? 1 : -1;
        }
        if (!pb_skip(r, wire)) {
            return -1;
        }
    }
    return 0;
}

/* A ValueInfoProto into a zeroed *vi; on failure nothing stays allocated. */
static int read_value_info(pb sub, om_value_info *vi, char *err, size_t cap) {
    memset(vi, 0, sizeof *vi);
    if (!parse_value_info(sub, vi, err, cap)) {
        free(vi->name);
        vi->name = NULL;
        return 0;
    }
    return 1;
}

/* GraphProto fields (onnx.proto3). */
enum { GRAPH_NODE = 1, GRAPH_INITIALIZER = 5, GRAPH_INPUT = 11, GRAPH_OUTPUT = 12 };

static int parse_graph(om_model *m, pb g, char *err, size_t cap) {
    int n_inputs = 0, n_outputs = 0, got;
    pb r, sub;
    /* Pass 1: initializers, which graph inputs may repeat (IR < 4). */
    for (r = g; (got = pb_next_field(&r, GRAPH_INITIALIZER, &sub)) > 0;) {
        if (!grow((void **)&m->inits, &m->cap_inits, m->n_inits + 1, sizeof(tensor))) {
            goto oom;
        }
        char *name = NULL;
        tensor *t = &m->inits[m->n_inits];
        if (!parse_tensor(sub, t, &name, err, cap)) {
            free(name);
            return 0;
        }
        if (name == NULL || find_value(m, name) >= 0) {
            om_errorf(err, cap, "an initializer has no name or a duplicate name");
            free(name);
            free(t->data);
            return 0;
        }
        if (add_value(m, name, V_INIT, m->n_inits) < 0) {
            free(t->data);
            goto oom;
        }
        m->n_inits++;
    }
    if (got < 0) {
        goto malformed;
    }
    /* Pass 2: the graph input that is not an initializer. */
    for (r = g; (got = pb_next_field(&r, GRAPH_INPUT, &sub)) > 0;) {
        om_value_info vi;
        if (!read_value_info(sub, &vi, err, cap)) {
            return 0;
        }
        if (find_value(m, vi.name) >= 0) {
            free(vi.name);
            continue;
        }
        if (n_inputs++ > 0) {
            om_errorf(err, cap, "the model has more than one input (`%s`, `%s`); infl8 runs "
                      "single-input models", m->input.name, vi.name);
            free(vi.name);
            return 0;
        }
        m->input = vi;
        m->input_id = add_value(m, strdup(vi.name), V_INPUT, 0);
        if (m->input_id < 0) {
            goto oom;
        }
    }
    if (got < 0) {
        goto malformed;
    }
    if (n_inputs == 0) {
        om_errorf(err, cap, "the model has no input");
        return 0;
    }
    /* Symbolic dims print as `?`, but for the batch, conventionally N. */
    const char *params[OM_MAX_RANK] = {0};
    if (m->input.rank > 0 && m->input.dims[0] < 0) {
        params[0] = "N";
    }
    describe_input(m, params);
    /* Pass 3: nodes, in file order (ONNX requires topological order). */
    for (r = g; (got = pb_next_field(&r, GRAPH_NODE, &sub)) > 0;) {
        if (!parse_node(m, sub, err, cap)) {
            return 0;
        }
    }
    if (got < 0) {
        goto malformed;
    }
    /* Pass 4: the output. */
    for (r = g; (got = pb_next_field(&r, GRAPH_OUTPUT, &sub)) > 0;) {
        om_value_info vi;
        if (!read_value_info(sub, &vi, err, cap)) {
            return 0;
        }
        if (n_outputs++ > 0) {
            om_errorf(err, cap, "the model has more than one output; infl8 runs single-output "
                      "models");
            free(vi.name);
            return 0;
        }
        m->output = vi;
        m->output_id = find_value(m, vi.name);
        if (m->output_id < 0) {
            om_errorf(err, cap, "the graph output `%s` is not computed by any node", vi.name);
            return 0;
        }
        m->values[m->output_id].last_use = m->n_nodes;
    }
    if (got < 0) {
        goto malformed;
    }
    if (n_outputs == 0) {
        om_errorf(err, cap, "the model has no output");
        return 0;
    }
    return 1;
malformed:
    om_errorf(err, cap, "malformed GraphProto (truncated or corrupt protobuf)");
    return 0;
oom:
    om_errorf(err, cap, "out of memory");
    return 0;
}

om_model *om_load(const char *path, char *err, size_t err_cap) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        om_errorf(err, err_cap, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    uint8_t *bytes = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            if (cap >= OM_MAX_FILE_BYTES) {
                fclose(f);
                free(bytes);
                om_errorf(err, err_cap, "%s: larger than 2 GiB, the protobuf limit", path);
                return NULL;
            }
            cap = cap ? cap * 2 : 1 << 16;
            uint8_t *p = realloc(bytes, cap);
            if (p == NULL) {
                fclose(f);
                free(bytes);
                om_errorf(err, err_cap, "%s: out of memory reading the file", path);
                return NULL;
            }
            bytes = p;
        }
        size_t got = fread(bytes + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            break;
        }
    }
    int read_error = ferror(f);
    fclose(f);
    if (read_error) {
        free(bytes);
        om_errorf(err, err_cap, "cannot read %s", path);
        return NULL;
    }
    om_model *m = om_load_bytes(bytes, n, path, err, err_cap);
    free(bytes);
    return m;
}

om_model *om_load_bytes(const uint8_t *bytes, size_t n, const char *label, char *err,
                        size_t err_cap) {
    char why[768];
    om_model *m = calloc(1, sizeof *m);
    if (m == NULL) {
        om_errorf(err, err_cap, "out of memory");
        return NULL;
    }
    m->path = strdup(label);
    m->input_id = m->output_id = -1;
    pb r = {bytes, bytes + n}, graph = {NULL, NULL};
    uint32_t field, wire;
    int ok = 1;
    why[0] = '\0';
    while (ok && r.p < r.end) {
        if (!pb_key(&r, &field, &wire)) {
            ok = 0;
        } else if (field == 7 && wire == WIRE_LEN) {
            ok = pb_sub(&r, &graph);
        } else {
            ok = pb_skip(&r, wire);
        }
    }
    if (!ok) {
        snprintf(why, sizeof why, "truncated or corrupt protobuf");
    } else if (graph.p == NULL) {
        snprintf(why, sizeof why, "no graph (field 7 of ModelProto)");
        ok = 0;
    } else {
        ok = parse_graph(m, graph, why, sizeof why);
    }
    if (!ok) {
        om_errorf(err, err_cap, "%s is not an ONNX model c-reference can run: %s", label, why);
        om_free(m);
        return NULL;
    }
    return m;
}

void om_free(om_model *m) {
    if (m == NULL) {
        return;
    }
    for (int i = 0; i < m->n_values; i++) {
        free(m->values[i].name);
    }
    for (int i = 0; i < m->n_nodes; i++) {
        free(m->nodes[i].name);
        free(m->nodes[i].constant.data);
    }
    for (int i = 0; i < m->n_inits; i++) {
        free(m->inits[i].data);
    }
    free(m->values);
    free(m->nodes);
    free(m->inits);
    free(m->input.name);
    free(m->output.name);
    free(m->path);
    free(m);
}

const om_value_info *om_input(const om_model *m) { return &m->input; }
const om_value_info *om_output(const om_model *m) { return &m->output; }
size_t om_node_count(const om_model *m) { return (size_t)m->n_nodes; }

/* ------------------------------------------------------------------------
 * Execution
 * ---------------------------------------------------------------------- */

static om_status alloc_tensor(tensor *t, int rank, const int64_t *dims, const char *who,
                              char *err, size_t cap) {
    size_t len;
    if (!elements(dims, rank, &len)) {
        om_errorf(err, cap, "%s: output too large", who);
        return OM_ERR_RUN;
    }
    t->rank = rank;
    memcpy(t->dims, dims, sizeof(int64_t) * (size_t)rank);
    t->len = len;
    t->data = malloc(len ? len * sizeof(float) : 1);
    if (t->data == NULL) {
        om_errorf(err, cap, "%s: out of memory (%zu values)", who, len);
        return OM_ERR_RUN;
    }
    return OM_OK;
}

static om_status run_conv(const om_model *m, const node *n, const tensor *x, tensor *y,
                          char *err, size_t cap) {
    const tensor *w = static_tensor(m, n->in[1]);
    const tensor *b = n->n_in == 3 ? static_tensor(m, n->in[2]) : NULL;
    int k = n->spatial;
    if (x->rank != k + 2) {
        om_errorf(err, cap, "Conv `%s`: input rank %d, the weight needs %d", n->name, x->rank,
                  k + 2);
        return OM_ERR_RUN;
    }
    int64_t N = x->dims[0], C = x->dims[1], M = w->dims[0], Cg = w->dims[1];
    int64_t G = n->group, Mg = M / G;
    if (C != Cg * G) {
        om_errorf(err, cap, "Conv `%s`: input has %lld channels, the weight takes %lld",
                  n->name, (long long)C, (long long)(Cg * G));
        return OM_ERR_RUN;
    }
    int64_t odims[OM_MAX_RANK];
    odims[0] = N;
    odims[1] = M;
    size_t isz = 1, osz = 1, ksz = 1;
    for (int i = 0; i < k; i++) {
        int64_t eff = n->dilations[i] * (w->dims[2 + i] - 1) + 1;
        int64_t span = x->dims[2 + i] + n->pads[i] + n->pads[k + i];
        if (span < eff) {
            om_errorf(err, cap, "Conv `%s`: spatial dim %d of the input (%lld, padded %lld) is "
                      "smaller than the kernel (%lld)", n->name, i, (long long)x->dims[2 + i],
                      (long long)span, (long long)eff);
            return OM_ERR_RUN;
        }
        odims[2 + i] = (span - eff) / n->strides[i] + 1;
        isz *= (size_t)x->dims[2 + i];
        osz *= (size_t)odims[2 + i];
        ksz *= (size_t)w->dims[2 + i];
    }
    om_status st = alloc_tensor(y, k + 2, odims, n->name, err, cap);
    if (st != OM_OK) {
        return st;
    }
    /* Input strides of the spatial dims. */
    size_t istride[OM_MAX_RANK];
    istride[k - 1] = 1;
    for (int i = k - 2; i >= 0; i--) {
        istride[i] = istride[i + 1] * (size_t)x->dims[3 + i];
    }
    const int L = k - 1; /* the innermost dim runs as a tight loop */
    const int64_t SL = x->dims[2 + L], OL = odims[2 + L], sL = n->strides[L];
    size_t rows = osz / (size_t)OL;
    for (int64_t in = 0; in < N; in++) {
        for (int64_t mo = 0; mo < M; mo++) {
            float *out = y->data + ((size_t)in * (size_t)M + (size_t)mo) * osz;
            float bias = b ? b->data[mo] : 0.0f;
            for (size_t i = 0; i < osz; i++) {
                out[i] = bias;
            }
            int64_t g = mo / Mg;
            for (int64_t c = 0; c < Cg; c++) {
                const float *inp =
                    x->data + ((size_t)in * (size_t)C + (size_t)(g * Cg + c)) * isz;
                const float *wk = w->data + ((size_t)mo * (size_t)Cg + (size_t)c) * ksz;
                int64_t kc[OM_MAX_RANK] = {0}; /* kernel position */
                for (size_t kf = 0; kf < ksz; kf++) {
                    float wv = wk[kf];
                    int64_t off = kc[L] * n->dilations[L] - n->pads[L];
                    int64_t lo = off >= 0 ? 0 : (-off + sL - 1) / sL;
                    int64_t hi = SL - 1 - off < 0 ? 0 : (SL - 1 - off) / sL + 1;
                    if (hi > OL) {
                        hi = OL;
                    }
                    int64_t oc[OM_MAX_RANK] = {0}; /* output position, outer dims */
                    for (size_t row = 0; row < rows; row++) {
                        /* Input offset of this row; skip rows in the padding. */
                        size_t base = 0;
                        int inside = 1;
                        for (int i = 0; i < L; i++) {
                            int64_t p = oc[i] * n->strides[i] - n->pads[i] +
                                        kc[i] * n->dilations[i];
                            if (p < 0 || p >= x->dims[2 + i]) {
                                inside = 0;
                                break;
                            }
                            base += (size_t)p * istride[i];
                        }
                        if (inside && lo < hi) {
                            float *o = out + row * (size_t)OL;
                            const float *src = inp + base + (size_t)(lo * sL + off);
                            for (int64_t j = lo; j < hi; j++, src += sL) {
                                o[j] += wv * *src;
                            }
                        }
                        for (int i = L - 1; i >= 0; i--) {
                            if (++oc[i] < odims[2 + i]) {
                                break;
                            }
                            oc[i] = 0;
                        }
                    }
                    for (int i = k - 1; i >= 0; i--) {
                        if (++kc[i] < w->dims[2 + i]) {
                            break;
                        }
                        kc[i] = 0;
                    }
                }
            }
        }
    }
    return OM_OK;
}

static om_status run_binary(const node *n, const tensor *a, const tensor *b, tensor *y,
                            char *err, size_t cap) {
    int r = a->rank > b->rank ? a->rank : b->rank;
    int64_t dims[OM_MAX_RANK];
    size_t sa[OM_MAX_RANK], sb[OM_MAX_RANK];
    size_t stride_a = 1, stride_b = 1;
    for (int i = r - 1; i >= 0; i--) {
        int ia = i - (r - a->rank), ib = i - (r - b->rank);
        int64_t da = ia >= 0 ? a->dims[ia] : 1, db = ib >= 0 ? b->dims[ib] : 1;
        if (da != db && da != 1 && db != 1) {
            om_errorf(err, cap, "%s: shapes do not broadcast (dim %d: %lld vs %lld)", n->name, i,
                      (long long)da, (long long)db);
            return OM_ERR_RUN;
        }
        dims[i] = da == 1 ? db : da;
        sa[i] = da == 1 ? 0 : stride_a;
        sb[i] = db == 1 ? 0 : stride_b;
        stride_a *= (size_t)da;
        stride_b *= (size_t)db;
    }
    om_status st = alloc_tensor(y, r, dims, n->name, err, cap);
    if (st != OM_OK) {
        return st;
    }
    int64_t coord[OM_MAX_RANK] = {0};
    size_t ia = 0, ib = 0;
    for (size_t f = 0; f < y->len; f++) {
        float u = a->data[ia], v = b->data[ib];
        y->data[f] = n->op == OP_ADD ? u + v : n->op == OP_SUB ? u - v : u * v;
        for (int i = r - 1; i >= 0; i--) {
            ia += sa[i];
            ib += sb[i];
            if (++coord[i] < dims[i]) {
                break;
            }
            ia -= sa[i] * (size_t)dims[i];
            ib -= sb[i] * (size_t)dims[i];
            coord[i] = 0;
        }
    }
    return OM_OK;
}

static om_status run_unary(const node *n, const tensor *x, tensor *y, char *err, size_t cap) {
    om_status st = alloc_tensor(y, x->rank, x->dims, n->name, err, cap);
    if (st != OM_OK) {
        return st;
    }
    for (size_t i = 0; i < x->len; i++) {
        float v = x->data[i];
        y->data[i] = n->op == OP_RELU      ? (v > 0.0f ? v : 0.0f)
                     : n->op == OP_SIGMOID ? 1.0f / (1.0f + expf(-v))
                                           : v;
    }
    return OM_OK;
}

om_status om_run(const om_model *m, const float *input, const uint64_t *shape, int rank,
                 float **out, uint64_t out_shape[OM_MAX_RANK], int *out_rank, char *err,
                 size_t err_cap) {
    if (m == NULL || input == NULL || shape == NULL || out == NULL || out_rank == NULL) {
        om_errorf(err, err_cap, "null argument");
        return OM_ERR_ARG;
    }
    if (rank < 1 || rank > OM_MAX_RANK) {
        om_errorf(err, err_cap, "input rank %d; the model's input is %s", rank, m->input_desc);
        return rank > OM_MAX_RANK ? OM_ERR_ARG : OM_ERR_SHAPE;
    }
    int fits = rank == m->input.rank;
    for (int i = 0; fits && i < rank; i++) {
        fits = shape[i] <= (uint64_t)INT64_MAX &&
               (m->input.dims[i] < 0 || (uint64_t)m->input.dims[i] == shape[i]);
    }
    char got[160];
    size_t len = (size_t)snprintf(got, sizeof got, "[");
    for (int i = 0; i < rank && len < sizeof got; i++) {
        len += (size_t)snprintf(got + len, sizeof got - len, "%s%llu", i ? ", " : "",
                                (unsigned long long)shape[i]);
    }
    if (len < sizeof got) {
        snprintf(got + len, sizeof got - len, "]");
    }
    if (!fits) {
        om_errorf(err, err_cap, "input shape %s does not fit the model's input %s", got,
                  m->input_desc);
        return OM_ERR_SHAPE;
    }
    tensor *vals = calloc((size_t)m->n_values, sizeof(tensor));
    unsigned char *owned = calloc((size_t)m->n_values, 1);
    if (vals == NULL || owned == NULL) {
        free(vals);
        free(owned);
        om_errorf(err, err_cap, "out of memory");
        return OM_ERR_RUN;
    }
    tensor *xin = &vals[m->input_id];
    xin->rank = rank;
    for (int i = 0; i < rank; i++) {
        xin->dims[i] = (int64_t)shape[i];
    }
    om_status st = OM_OK;
    if (!elements(xin->dims, rank, &xin->len)) {
        om_errorf(err, err_cap, "input shape %s is too large", got);
        st = OM_ERR_SHAPE;
    }
    /* Borrowed: ops never write to their inputs. */
    xin->data = (float *)(uintptr_t)input;
    for (int i = 0; i < m->n_values; i++) {
        const tensor *t = static_tensor(m, i);
        if (t != NULL) {
            vals[i] = *t;
        }
    }
    for (int j = 0; st == OM_OK && j < m->n_nodes; j++) {
        const node *n = &m->nodes[j];
        tensor *y = &vals[n->out];
        const tensor *a = &vals[n->in[0]];
        switch (n->op) {
        case OP_CONSTANT:
            continue; /* already in vals, borrowed from the model */
        case OP_CONV:
            st = run_conv(m, n, a, y, err, err_cap);
            break;
        case OP_ADD:
        case OP_SUB:
        case OP_MUL:
            st = run_binary(n, a, &vals[n->in[1]], y, err, err_cap);
            break;
        default:
            st = run_unary(n, a, y, err, err_cap);
            break;
        }
        if (st != OM_OK) {
            break;
        }
        owned[n->out] = 1;
        /* Free what no later node reads: peak memory stays a few tensors. */
        for (int i = 0; i < n->n_in; i++) {
            int id = n->in[i];
            if (id >= 0 && owned[id] && m->values[id].last_use == j) {
                free(vals[id].data);
                vals[id].data = NULL;
                owned[id] = 0;
            }
        }
    }
    if (st == OM_OK) {
        tensor *y = &vals[m->output_id];
        if (owned[m->output_id]) {
            *out = y->data;
            owned[m->output_id] = 0;
        } else {
            /* The output is the input or a constant: hand out a copy. */
            *out = malloc(y->len ? y->len * sizeof(float) : 1);
            if (*out == NULL) {
                om_errorf(err, err_cap, "out of memory");
                st = OM_ERR_RUN;
            } else if (y->len) {
                memcpy(*out, y->data, y->len * sizeof(float));
            }
        }
        if (st == OM_OK) {
            *out_rank = y->rank;
            for (int i = 0; i < y->rank; i++) {
                out_shape[i] = (uint64_t)y->dims[i];
            }
        }
    }
    for (int i = 0; i < m->n_values; i++) {
        if (owned[i]) {
            free(vals[i].data);
        }
    }
    free(vals);
    free(owned);
    return st;
}
