/* infl8 backend plugin `c-reference`, written in C against infl8_plugin.h.
 *
 * The backend runs ONNX models with onnx_mini.c: a naive, dependency-free
 * reference of Conv/Relu/Sigmoid/Add/Sub/Mul models, useful as a template
 * for a vendor plugin and as an independent check of other backends. It is
 * correct, not fast.
 *
 * What the ABI asks of a plugin, and where this file does it:
 * - one exported symbol, infl8_plugin_entry, returning a static table;
 * - every pointer argument checked, every failure a status code plus a
 *   message in the caller's buffer (cut at a UTF-8 boundary);
 * - struct_size respected both ways: refuse a caller's struct that is too
 *   small, never write past the size it declares;
 * - reentrancy: a loaded model is never modified, so concurrent runs on one
 *   handle are safe without a lock;
 * - outputs malloc'ed per run and released by tensor_free, from any thread.
 * C has no exceptions, so there is nothing to catch; a C++ plugin would
 * wrap each entry point in try/catch and return INFL8_PANIC. */
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infl8_plugin.h"
#include "onnx_mini.h"

#define PLUGIN_NAME "c-reference"
#define PLUGIN_VERSION "0.1.0"

static const Infl8BackendDesc BACKENDS[] = {
    {"c-reference", "Reference ONNX runner in plain C (Conv/Relu/Sigmoid/Add/Sub/Mul; "
                    "single-threaded, for checking and as an SDK example)"},
};

/* The host's services, kept for logging. Atomic because the entry may run
 * on several threads at once (it stores the same pointer each time). */
static _Atomic(const Infl8HostApi *) g_host;

static void log_info(const char *message) {
    const Infl8HostApi *h = atomic_load(&g_host);
    /* Use a field only when the host's struct_size covers it. */
    if (h != NULL && h->struct_size >= offsetof(Infl8HostApi, log) + sizeof h->log &&
        h->log != NULL &&
        h->log_max_level >= INFL8_LOG_INFO) {
        h->log(h->log_ctx, INFL8_LOG_INFO, PLUGIN_NAME, message);
    }
}

/* The plugin's handle: the parsed model, its I/O as the ABI describes it. */
typedef struct {
    om_model *model;
    Infl8ModelIo io;
} Handle;

static void describe(const om_value_info *v, Infl8TensorDesc *d) {
    memset(d, 0, sizeof *d);
    d->name = v->name;
    d->rank = (uint32_t)v->rank;
    for (int i = 0; i < v->rank; i++) {
        d->dims[i] = v->dims[i] < 0 ? INFL8_DIM_SYMBOLIC : v->dims[i];
    }
}

/* The value of the top-level string key `key` in the options JSON, copied
 * into `out`; 0 if absent. A deliberately small scanner: the options are a
 * flat object the host writes, and unknown keys must be ignored anyway. */
static int json_string(const char *json, const char *key, char *out, size_t cap) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    const char *p = json ? strstr(json, pattern) : NULL;
    if (p == NULL) {
        return 0;
    }
    p += strlen(pattern);
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ':') {
        p++;
    }
    if (*p != '"') {
        return 0;
    }
    p++;
    size_t n = 0;
    while (p[n] && p[n] != '"' && n + 1 < cap) {
        n++;
    }
    memcpy(out, p, n);
    out[n] = '\0';
    return 1;
}

static int32_t model_load(uint32_t backend_index, const char *model_path,
                          const char *options_json, Infl8Model **out_model, char *err,
                          size_t err_cap) {
    if (model_path == NULL || out_model == NULL) {
        om_errorf(err, err_cap, "model_load: model_path and out_model must not be NULL");
        return INFL8_INVALID_ARGUMENT;
    }
    if (backend_index >= sizeof BACKENDS / sizeof BACKENDS[0]) {
        om_errorf(err, err_cap, "model_load: no backend %u in plugin " PLUGIN_NAME,
                  backend_index);
        return INFL8_INVALID_ARGUMENT;
    }
    char precision[16];
    if (json_string(options_json, "precision", precision, sizeof precision) &&
        strcmp(precision, "fp32") != 0) {
        om_errorf(err, err_cap, "precision `%s`: c-reference computes in fp32 only", precision);
        return INFL8_UNSUPPORTED;
    }
    Handle *h = calloc(1, sizeof *h);
    if (h == NULL) {
        om_errorf(err, err_cap, "out of memory");
        return INFL8_ERROR;
    }
    h->model = om_load(model_path, err, err_cap);
    if (h->model == NULL) {
        free(h);
        return INFL8_LOAD_FAILED;
    }
    h->io.struct_size = sizeof h->io;
    describe(om_input(h->model), &h->io.input);
    describe(om_output(h->model), &h->io.output);
    char line[512];
    snprintf(line, sizeof line, "loaded %s (%zu nodes)", model_path,
             om_node_count(h->model));
    log_info(line);
    *out_model = (Infl8Model *)h;
    return INFL8_OK;
}

static int32_t model_free(Infl8Model *model) {
    Handle *h = (Handle *)model;
    if (h != NULL) {
        om_free(h->model);
        free(h);
    }
    return INFL8_OK;
}

static int32_t model_io(const Infl8Model *model, Infl8ModelIo *out_io, char *err,
                        size_t err_cap) {
    if (model == NULL || out_io == NULL) {
        om_errorf(err, err_cap, "model_io: model and out_io must not be NULL");
        return INFL8_INVALID_ARGUMENT;
    }
    if (out_io->struct_size < sizeof(Infl8ModelIo)) {
        om_errorf(err, err_cap, "model_io: out_io->struct_size %u < %zu", out_io->struct_size,
                  sizeof(Infl8ModelIo));
        return INFL8_INVALID_ARGUMENT;
    }
    const Handle *h = (const Handle *)model;
    /* Only the fields this plugin knows: a newer host's tail stays as it
     * set it. struct_size stays the caller's. */
    out_io->input = h->io.input;
    out_io->output = h->io.output;
    return INFL8_OK;
}

static int32_t model_run(const Infl8Model *model, const float *input, const uint64_t *shape,
                         uint32_t rank, Infl8TensorOut *out, char *err, size_t err_cap) {
    if (model == NULL || input == NULL || shape == NULL || out == NULL) {
        om_errorf(err, err_cap, "model_run: model, input, shape and out must not be NULL");
        return INFL8_INVALID_ARGUMENT;
    }
    if (out->struct_size < sizeof(Infl8TensorOut)) {
        om_errorf(err, err_cap, "model_run: out->struct_size %u < %zu", out->struct_size,
                  sizeof(Infl8TensorOut));
        return INFL8_INVALID_ARGUMENT;
    }
    if (rank > INFL8_MAX_RANK) {
        om_errorf(err, err_cap, "model_run: rank %u exceeds INFL8_MAX_RANK (%d)", rank,
                  INFL8_MAX_RANK);
        return INFL8_INVALID_ARGUMENT;
    }
    const Handle *h = (const Handle *)model;
    float *data = NULL;
    uint64_t out_shape[OM_MAX_RANK];
    int out_rank = 0;
    om_status st =
        om_run(h->model, input, shape, (int)rank, &data, out_shape, &out_rank, err, err_cap);
    switch (st) {
    case OM_OK:
        break;
    case OM_ERR_SHAPE:
        return INFL8_SHAPE_MISMATCH;
    case OM_ERR_ARG:
        return INFL8_INVALID_ARGUMENT;
    default:
        return INFL8_RUN_FAILED;
    }
    uint64_t len = 1;
    out->rank = (uint32_t)out_rank;
    for (int i = 0; i < out_rank; i++) {
        out->shape[i] = out_shape[i];
        len *= out_shape[i];
    }
    out->data = data;
    out->len = len;
    out->owner = data;
    return INFL8_OK;
}

static int32_t tensor_free(void *owner) {
    free(owner);
    return INFL8_OK;
}

static const Infl8PluginTable TABLE = {
    .abi_version = INFL8_ABI_VERSION,
    .struct_size = sizeof(Infl8PluginTable),
    .plugin_name = PLUGIN_NAME,
    .plugin_version = PLUGIN_VERSION,
    .backend_count = sizeof BACKENDS / sizeof BACKENDS[0],
    .backend_desc_size = sizeof(Infl8BackendDesc),
    .backends = BACKENDS,
    .model_load = model_load,
    .model_free = model_free,
    .model_io = model_io,
    .model_run = model_run,
    .tensor_free = tensor_free,
};

INFL8_EXPORT int32_t infl8_plugin_entry(uint32_t host_abi_version, const Infl8HostApi *host,
                                        const Infl8PluginTable **out_table) {
    if (out_table == NULL) {
        return INFL8_INVALID_ARGUMENT;
    }
    /* The table is stored even on a mismatch, so the host can name us. */
    *out_table = &TABLE;
    if ((host_abi_version >> 16) != INFL8_ABI_MAJOR) {
        return INFL8_ABI_MISMATCH;
    }
    if (host != NULL) {
        atomic_store(&g_host, host);
    }
    return INFL8_OK;
}
